"""Fast CPU pooling (2D and 3D): max and average pooling, forward and backward.

Each kernel is a Numba loop over a range of (n, c) planes, one range per thread; a plane is
never shared, so backward passes scatter into gx without races and in a fixed order. Within a
plane the work goes one output row at a time and one kernel tap at a time, so the innermost
loop runs along the row and LLVM vectorises it. 2D runs as 3D with depth 1.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cnnfast.cpu._im2col import as3d, geometry3, valid_range
from cnnfast.cpu._parallel import parallel_for

Ints = tuple[int, ...]

# Output elements per thread below which splitting the work costs more than it saves.
MIN_PER_THREAD = 1 << 14


def _output_size(size, kernel, stride, padding) -> Ints:
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, kernel, stride, padding))


def _planes(shape: Ints) -> int:
    return int(shape[0]) * int(shape[1])


def _min_planes(out: Ints) -> int:
    per_plane = max(1, int(np.prod(out)))
    return max(1, MIN_PER_THREAD // per_plane)


def max_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints):
    """x (N, C, *S) -> (y, idx), both (N, C, *O) with O = (S + 2P - KS) // stride + 1.

    ``idx`` (int64) is the flat index within one (n, c) plane of the unpadded input of the
    first maximum in window scan order; padding never wins; a NaN counts as a maximum.
    """
    nd = x.ndim - 2
    x5 = as3d(x)
    ks, st, pd = geometry3(kernel, 1), geometry3(stride, 1), geometry3(padding, 0)
    out = _output_size(x5.shape[2:], ks, st, pd)
    y = np.empty(x5.shape[:2] + out, dtype=x5.dtype)
    idx = np.empty(x5.shape[:2] + out, dtype=np.int64)
    if y.size:
        parallel_for(lambda a, b: _max_forward(x5, ks, st, pd, y, idx, a, b), _planes(x5.shape),
                     min_per_thread=_min_planes(out))
    shape = x.shape[:2] + out[3 - nd:]
    return y.reshape(shape), idx.reshape(shape)


def max_pool_backward(gy, idx, x_shape: Ints):
    """gy (N, C, *O), idx (N, C, *O) -> gx (x_shape): gy added at idx, overlaps accumulating."""
    x_shape = tuple(int(s) for s in x_shape)
    gy2 = np.ascontiguousarray(gy).reshape(_planes(gy.shape), -1)
    idx2 = np.ascontiguousarray(idx, dtype=np.int64).reshape(gy2.shape)
    gx2 = np.zeros((_planes(x_shape), int(np.prod(x_shape[2:]))), dtype=gy2.dtype)
    if gy2.size:
        parallel_for(lambda a, b: _max_backward(gy2, idx2, gx2, a, b), gy2.shape[0],
                     min_per_thread=max(1, MIN_PER_THREAD // max(1, gy2.shape[1])))
    return gx2.reshape(x_shape)


def avg_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints):
    """x (N, C, *S) -> y (N, C, *O): window sums (padding counts as 0) / prod(kernel)."""
    nd = x.ndim - 2
    x5 = as3d(x)
    ks, st, pd = geometry3(kernel, 1), geometry3(stride, 1), geometry3(padding, 0)
    out = _output_size(x5.shape[2:], ks, st, pd)
    y = np.empty(x5.shape[:2] + out, dtype=x5.dtype)
    if y.size:
        parallel_for(lambda a, b: _avg_forward(x5, ks, st, pd, y, a, b), _planes(x5.shape),
                     min_per_thread=_min_planes(out))
    return y.reshape(x.shape[:2] + out[3 - nd:])


def avg_pool_backward(gy, x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints):
    """gy (N, C, *O) -> gx (x_shape): each gy / prod(kernel) added over its window."""
    x_shape = tuple(int(s) for s in x_shape)
    gy5 = as3d(gy)
    ks, st, pd = geometry3(kernel, 1), geometry3(stride, 1), geometry3(padding, 0)
    gx5 = np.zeros(x_shape[:2] + geometry3(x_shape[2:], 1), dtype=gy5.dtype)
    if gy5.size:
        parallel_for(lambda a, b: _avg_backward(gy5, ks, st, pd, gx5, a, b), _planes(x_shape),
                     min_per_thread=_min_planes(gy5.shape[2:]))
    return gx5.reshape(x_shape)


@njit(nogil=True, cache=True)
def _max_forward(x, ks, st, pd, y, idx, start, stop):
    """Planes start..stop of y and idx (N, C, OD, OH, OW). Per output row, each kernel tap in
    scan order replaces the running maximum where it is larger or NaN, or where none is yet
    set (idx < 0): the first maximum wins, as in the reference."""
    _, C, D, H, W = x.shape
    _, _, OD, OH, OW = y.shape
    KD, KH, KW = ks
    SD, SH, SW = st
    PD, PH, PW = pd
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    idxf = idx.reshape(-1)
    plane = D * H * W
    out_plane = OD * OH * OW
    for task in range(start, stop):
        xp = xf[task * plane:(task + 1) * plane]
        for od in range(OD):
            for oh in range(OH):
                row = task * out_plane + (od * OH + oh) * OW
                best = yf[row:row + OW]
                where = idxf[row:row + OW]
                where[:] = -1
                best[:] = 0
                for kd in range(KD):
                    i_d = od * SD - PD + kd
                    if i_d < 0 or i_d >= D:
                        continue
                    for kh in range(KH):
                        i_h = oh * SH - PH + kh
                        if i_h < 0 or i_h >= H:
                            continue
                        for kw in range(KW):
                            lo, hi = valid_range(W, OW, SW, PW, kw)
                            first = (i_d * H + i_h) * W + lo * SW - PW + kw
                            src = xp[first:]
                            b = best[lo:hi]
                            w = where[lo:hi]
                            for i in range(hi - lo):
                                v = src[i * SW]
                                take = (w[i] < 0) | (v > b[i]) | (v != v)
                                b[i] = v if take else b[i]
                                w[i] = first + i * SW if take else w[i]


@njit(nogil=True, cache=True)
def _max_backward(gy, idx, gx, start, stop):
    """Planes start..stop of gx (planes, S): gy (planes, O) added at idx, in output order.
    An index outside the plane (never produced by the forward) is skipped, not followed."""
    size = gx.shape[1]
    for p in range(start, stop):
        g = gy[p]
        where = idx[p]
        dst = gx[p]
        for i in range(g.size):
            j = where[i]
            if 0 <= j < size:
                dst[j] += g[i]


@njit(nogil=True, cache=True)
def _avg_forward(x, ks, st, pd, y, start, stop):
    """Planes start..stop of y (N, C, OD, OH, OW): per output row, the in-bounds taps added in
    scan order, then divided by prod(kernel)."""
    _, C, D, H, W = x.shape
    _, _, OD, OH, OW = y.shape
    KD, KH, KW = ks
    SD, SH, SW = st
    PD, PH, PW = pd
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    plane = D * H * W
    out_plane = OD * OH * OW
    count = np.full(1, KD * KH * KW, dtype=y.dtype)[0]
    for task in range(start, stop):
        xp = xf[task * plane:(task + 1) * plane]
        for od in range(OD):
            for oh in range(OH):
                row = task * out_plane + (od * OH + oh) * OW
                acc = yf[row:row + OW]
                acc[:] = 0
                for kd in range(KD):
                    i_d = od * SD - PD + kd
                    if i_d < 0 or i_d >= D:
                        continue
                    for kh in range(KH):
                        i_h = oh * SH - PH + kh
                        if i_h < 0 or i_h >= H:
                            continue
                        for kw in range(KW):
                            lo, hi = valid_range(W, OW, SW, PW, kw)
                            src = xp[(i_d * H + i_h) * W + lo * SW - PW + kw:]
                            a = acc[lo:hi]
                            for i in range(hi - lo):
                                a[i] += src[i * SW]
                for i in range(OW):
                    acc[i] = acc[i] / count


@njit(nogil=True, cache=True)
def _avg_backward(gy, ks, st, pd, gx, start, stop):
    """Planes start..stop of gx (N, C, D, H, W): each output row's gy / prod(kernel) added to
    the in-bounds taps of its windows, in scan order."""
    _, C, D, H, W = gx.shape
    _, _, OD, OH, OW = gy.shape
    KD, KH, KW = ks
    SD, SH, SW = st
    PD, PH, PW = pd
    gyf = gy.reshape(-1)
    gxf = gx.reshape(-1)
    plane = D * H * W
    out_plane = OD * OH * OW
    count = np.full(1, KD * KH * KW, dtype=gy.dtype)[0]
    share = np.empty(OW, dtype=gy.dtype)
    for task in range(start, stop):
        xp = gxf[task * plane:(task + 1) * plane]
        for od in range(OD):
            for oh in range(OH):
                row = task * out_plane + (od * OH + oh) * OW
                for i in range(OW):
                    share[i] = gyf[row + i] / count
                for kd in range(KD):
                    i_d = od * SD - PD + kd
                    if i_d < 0 or i_d >= D:
                        continue
                    for kh in range(KH):
                        i_h = oh * SH - PH + kh
                        if i_h < 0 or i_h >= H:
                            continue
                        for kw in range(KW):
                            lo, hi = valid_range(W, OW, SW, PW, kw)
                            dst = xp[(i_d * H + i_h) * W + lo * SW - PW + kw:]
                            for i in range(hi - lo):
                                dst[i * SW] += share[lo + i]
