"""Fast CPU pooling (2D and 3D): max and average pooling, forward and backward.

Each kernel is a Numba loop over (n, c) planes: parallel for max pooling; average pooling (in
none of the target models) runs on one thread to keep compile time down. A plane is never
shared, so backward passes scatter into gx without races and in a fixed order. Each output
scans the taps of its window that fall inside the input (worked out once per axis: first tap,
end, step = dilation), so padding and ceil mode's overhang are never read. Average pooling
divides by a per-output divisor map (:func:`cnnfast.shapes.avg_pool_divisor`). 2D runs as 3D
with depth 1.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from cnnfast.cpu._im2col import as3d, geometry3
from cnnfast.cpu._parallel import parallel_kernel
from cnnfast.shapes import avg_pool_divisor, output_size

Ints = tuple[int, ...]


def _planes(shape: Ints) -> int:
    return int(shape[0]) * int(shape[1])


def max_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints, dilation: Ints | None = None,
                     ceil_mode: bool = False):
    """x (N, C, *S) -> (y, idx), both (N, C, *O), O from :func:`cnnfast.shapes.output_size`.

    ``idx`` (int64) is the flat index within one (n, c) plane of the unpadded input of the
    first maximum in window scan order; padding never wins; a NaN counts as a maximum.
    """
    nd = x.ndim - 2
    x5 = as3d(x)
    ks, st, pd = geometry3(kernel, 1), geometry3(stride, 1), geometry3(padding, 0)
    dl = geometry3(dilation or (1,) * nd, 1)
    out = output_size(x5.shape[2:], ks, st, pd, dl, ceil_mode)
    y = np.empty(x5.shape[:2] + out, dtype=x5.dtype)
    idx = np.empty(x5.shape[:2] + out, dtype=np.int64)
    if y.size:
        _max_forward(x5, ks, st, pd, dl, y, idx)
    shape = x.shape[:2] + out[3 - nd:]
    return y.reshape(shape), idx.reshape(shape)


def max_pool_backward(gy, idx, x_shape: Ints):
    """gy (N, C, *O), idx (N, C, *O) -> gx (x_shape): gy added at idx, overlaps accumulating."""
    x_shape = tuple(int(s) for s in x_shape)
    gy2 = np.ascontiguousarray(gy).reshape(_planes(gy.shape), -1)
    idx2 = np.ascontiguousarray(idx, dtype=np.int64).reshape(gy2.shape)
    gx2 = np.zeros((_planes(x_shape), int(np.prod(x_shape[2:]))), dtype=gy2.dtype)
    if gy2.size:
        _max_backward(gy2, idx2, gx2)
    return gx2.reshape(x_shape)


def _avg_setup(shape: Ints, kernel: Ints, stride: Ints, padding: Ints, ceil_mode: bool,
               count_include_pad: bool, divisor_override: int | None, dtype):
    """3D geometry, O and the flat divisor map (O's size, ``dtype``) of average pooling."""
    ks, st, pd = geometry3(kernel, 1), geometry3(stride, 1), geometry3(padding, 0)
    size = geometry3(shape[2:], 1)
    out = output_size(size, ks, st, pd, None, ceil_mode)
    divisor = avg_pool_divisor(size, ks, st, pd, out, count_include_pad, divisor_override)
    return ks, st, pd, out, divisor.reshape(-1).astype(dtype)


def avg_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints, ceil_mode: bool = False,
                     count_include_pad: bool = True, divisor_override: int | None = None):
    """x (N, C, *S) -> y (N, C, *O): window sums (padding counts as 0) / the divisor map."""
    nd = x.ndim - 2
    x5 = as3d(x)
    ks, st, pd, out, divisor = _avg_setup(x.shape, kernel, stride, padding, ceil_mode,
                                          count_include_pad, divisor_override, x5.dtype)
    y = np.empty(x5.shape[:2] + out, dtype=x5.dtype)
    if y.size:
        _avg_forward(x5, ks, st, pd, divisor, y)
    return y.reshape(x.shape[:2] + out[3 - nd:])


def avg_pool_backward(gy, x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints,
                      ceil_mode: bool = False, count_include_pad: bool = True,
                      divisor_override: int | None = None):
    """gy (N, C, *O) -> gx (x_shape): each gy / its divisor added over its window."""
    x_shape = tuple(int(s) for s in x_shape)
    gy5 = as3d(gy)
    ks, st, pd, _, divisor = _avg_setup(x_shape, kernel, stride, padding, ceil_mode,
                                        count_include_pad, divisor_override, gy5.dtype)
    gx5 = np.zeros(x_shape[:2] + geometry3(x_shape[2:], 1), dtype=gy5.dtype)
    if gy5.size:
        _avg_backward(gy5, ks, st, pd, divisor, gx5)
    return gx5.reshape(x_shape)


@njit(nogil=True, cache=True)
def _windows(size, out, kernel, stride, pad, dilation):
    """Per output position along one axis, the taps of its window inside the input: positions
    ``range(lo, hi, dilation)`` (the window clipped to the input: padding is never read; empty,
    lo >= hi, when no tap lands inside)."""
    bounds = np.empty((out, 2), dtype=np.int64)
    for o in range(out):
        start = o * stride - pad
        first = 0 if start >= 0 else (-start + dilation - 1) // dilation  # first tap >= 0
        last = min(kernel - 1, (size - 1 - start) // dilation)  # last tap < size
        bounds[o, 0] = start + first * dilation
        bounds[o, 1] = start + last * dilation + 1 if last >= first else bounds[o, 0]
    return bounds


@njit(nogil=True, cache=True, inline="always")
def _scan(xp, p, k, best):
    """One step of a max scan: position p replaces (k, best) if larger or NaN."""
    v = xp[p]
    take = np.int64((v > best) | (v != v))
    k += (p - k) * take
    best = max(best, v) if v == v else v
    return k, best


@parallel_kernel
def _max_forward(x, ks, st, pd, dl, y, idx):
    """y and idx (N, C, OD, OH, OW), one task per (n, c) plane. Each output scans its window in
    order and keeps the index of the first maximum (a later NaN wins too, as in the reference).

    The index is updated by arithmetic, not by a conditional: LLVM turns a conditional select
    here into a branch, and on real data that branch is mispredicted half the time (5x slower).
    """
    _, C, D, H, W = x.shape
    _, _, OD, OH, OW = y.shape
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    idxf = idx.reshape(-1)
    plane = D * H * W
    wd = _windows(D, OD, ks[0], st[0], pd[0], dl[0])
    wh = _windows(H, OH, ks[1], st[1], pd[1], dl[1])
    ww = _windows(W, OW, ks[2], st[2], pd[2], dl[2])
    step = dl[2]
    zero = np.zeros(1, dtype=y.dtype)[0]
    for task in prange(x.shape[0] * C):
        xp = xf[task * plane:(task + 1) * plane]
        out = task * OD * OH * OW
        for od in range(OD):
            d0, d1 = wd[od, 0], wd[od, 1]
            for oh in range(OH):
                h0, h1 = wh[oh, 0], wh[oh, 1]
                for ow in range(OW):
                    w0, w1 = ww[ow, 0], ww[ow, 1]
                    if d0 >= d1 or h0 >= h1 or w0 >= w1:  # only padding: nothing to pick
                        yf[out] = zero
                        idxf[out] = -1
                        out += 1
                        continue
                    k = (d0 * H + h0) * W + w0
                    best = xp[k]
                    width = w1 - w0
                    for i_d in range(d0, d1, dl[0]):
                        for i_h in range(h0, h1, dl[1]):
                            p = (i_d * H + i_h) * W + w0
                            # Rows of 2 (the usual 2x2 pooling) spelled out: a loop of unknown
                            # length around the update makes LLVM branch on it again.
                            if width == 2 and step == 1:
                                k, best = _scan(xp, p, k, best)
                                k, best = _scan(xp, p + 1, k, best)
                            else:
                                for i in range(0, width, step):
                                    k, best = _scan(xp, p + i, k, best)
                    yf[out] = best
                    idxf[out] = k
                    out += 1


@parallel_kernel
def _max_backward(gy, idx, gx):
    """gx (planes, S), one task per plane: gy (planes, O) added at idx, in output order.
    An index outside the plane (-1: a window of padding only) is skipped, not followed."""
    size = gx.shape[1]
    for p in prange(gy.shape[0]):
        g = gy[p]
        where = idx[p]
        dst = gx[p]
        for i in range(g.size):
            j = where[i]
            if 0 <= j < size:
                dst[j] += g[i]


@njit(nogil=True, cache=True)
def _avg_forward(x, ks, st, pd, divisor, y):
    """y (N, C, OD, OH, OW), one task per (n, c) plane: each window's in-bounds elements summed in
    scan order (padding adds nothing), divided by its entry of ``divisor`` (OD * OH * OW)."""
    _, C, D, H, W = x.shape
    _, _, OD, OH, OW = y.shape
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    plane = D * H * W
    wd = _windows(D, OD, ks[0], st[0], pd[0], 1)
    wh = _windows(H, OH, ks[1], st[1], pd[1], 1)
    ww = _windows(W, OW, ks[2], st[2], pd[2], 1)
    zero = np.zeros(1, dtype=y.dtype)[0]
    plane_out = OD * OH * OW
    for task in range(x.shape[0] * C):
        xp = xf[task * plane:(task + 1) * plane]
        base = out = task * plane_out
        for od in range(OD):
            for oh in range(OH):
                for ow in range(OW):
                    total = zero
                    for i_d in range(wd[od, 0], wd[od, 1]):
                        for i_h in range(wh[oh, 0], wh[oh, 1]):
                            row = (i_d * H + i_h) * W
                            for i_w in range(ww[ow, 0], ww[ow, 1]):
                                total += xp[row + i_w]
                    yf[out] = total / divisor[out - base]
                    out += 1


@njit(nogil=True, cache=True)
def _avg_backward(gy, ks, st, pd, divisor, gx):
    """gx (N, C, D, H, W), one task per (n, c) plane: each output's gy / its divisor added to the
    in-bounds elements of its window, outputs in order."""
    _, C, D, H, W = gx.shape
    _, _, OD, OH, OW = gy.shape
    gyf = gy.reshape(-1)
    gxf = gx.reshape(-1)
    plane = D * H * W
    wd = _windows(D, OD, ks[0], st[0], pd[0], 1)
    wh = _windows(H, OH, ks[1], st[1], pd[1], 1)
    ww = _windows(W, OW, ks[2], st[2], pd[2], 1)
    plane_out = OD * OH * OW
    for task in range(gx.shape[0] * C):
        xp = gxf[task * plane:(task + 1) * plane]
        base = out = task * plane_out
        for od in range(OD):
            for oh in range(OH):
                for ow in range(OW):
                    share = gyf[out] / divisor[out - base]
                    out += 1
                    for i_d in range(wd[od, 0], wd[od, 1]):
                        for i_h in range(wh[oh, 0], wh[oh, 1]):
                            row = (i_d * H + i_h) * W
                            for i_w in range(ww[ow, 0], ww[ow, 1]):
                                xp[row + i_w] += share
