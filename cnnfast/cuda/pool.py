"""CUDA max and average pooling (2D and 3D), forward and backward.

2D runs as 3D with D = KD = SD = DD = 1 and PD = 0. Forward kernels give each thread output
elements (grid-stride over the flat output, so consecutive threads read neighbouring windows);
backward kernels give each thread input elements and gather from the output windows that can
contain them: along each axis od runs over [ceil((d + PD - KD + 1) / SD), floor((d + PD) / SD)]
clipped to [0, OD). Gathering instead of scattering needs no float atomics and sums in a fixed
order, so the bits repeat. Flat offsets are int64. The index arithmetic the kernels share (a
flat index split into plane and coordinates, a window's in-bounds taps, the output range that
covers an input coordinate) is written once, as device functions.

Max pooling takes a dilation (taps at ``start + k * dilation``), and both take PyTorch's ceil
mode: only the output size changes (:func:`cnnfast.shapes.output_size`); windows are clipped to
the input, so ceil mode's overhang is never read. Average pooling divides each window by its
entry of a divisor map (:func:`cnnfast.shapes.avg_pool_divisor`: count_include_pad, or the
in-bounds count, or divisor_override), a small device table cached per geometry.

The contract's ``max_pool_backward(gy, idx, x_shape)`` is not told the window geometry, so by
default a first pass over ``idx`` records, per axis and input coordinate, the range of output
coordinates that selected it (block-local shared-memory tables merged with integer atomic
min/max: exact, order-free); that range lies inside the geometric one, so the gather visits no
more windows than it would with the geometry. Callers that know the geometry may pass it
(``kernel=``, ``stride=``, ``padding=``, ``dilation=``) and skip that pass.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, int32

from cnnfast.cuda import _runtime as rt
from cnnfast.shapes import avg_pool_divisor, output_size

Ints = tuple[int, ...]

_MAX_BLOCKS = 4096  # grid-stride kernels: enough blocks to fill a large GPU a few times over
_GEO = 19  # entries of a geometry tuple (see _geometry)


def _geometry(x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints,
              dilation: Ints | None = None, ceil_mode: bool = False) -> tuple[int, ...]:
    """(planes, D, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW), 2D lifted
    to 3D."""
    lift = 3 - (len(x_shape) - 2)
    size = [1] * lift + [int(s) for s in x_shape[2:]]
    kernel = [1] * lift + [int(k) for k in kernel]
    stride = [1] * lift + [int(s) for s in stride]
    padding = [0] * lift + [int(p) for p in padding]
    dilation = [1] * lift + [int(d) for d in (dilation or (1,) * (3 - lift))]
    out = output_size(size, kernel, stride, padding, dilation, ceil_mode)
    planes = int(x_shape[0]) * int(x_shape[1])
    return (planes, *size, *kernel, *stride, *padding, *dilation, *out)


def _out_shape(x_shape: Ints, geo) -> tuple[int, ...]:
    nd = len(x_shape) - 2
    return tuple(int(s) for s in x_shape[:2]) + tuple(geo[_GEO - nd:_GEO])


def _grid(total: int) -> tuple[int, int]:
    threads = rt.current_config().threads
    return max(1, min(rt.cdiv(total, threads), _MAX_BLOCKS)), threads


# --- index arithmetic shared by the kernels (device functions) ---------------------------------

@cuda.jit(device=True)
def _split(i, A, B, C):
    """Flat index i over (planes, A, B, C) -> (plane, a, b, c)."""
    c = i % C
    q = i // C
    b = q % B
    q //= B
    return q // A, q % A, b, c


@cuda.jit(device=True)
def _taps(o, S, P, K, DL, SIZE):
    """The input coordinates output o's window reads along one axis, range(lo, hi, DL): taps
    o * S - P + k * DL (k < K) clipped to [0, SIZE), so padding is never read (lo >= hi when
    none is inside)."""
    start = o * S - P
    first = 0 if start >= 0 else (DL - 1 - start) // DL
    last = min(K - 1, (SIZE - 1 - start) // DL)
    lo = start + first * DL
    return lo, (start + last * DL + 1) if last >= first else lo


@cuda.jit(device=True)
def _covering(s, P, K, S, OUT):
    """The output coordinates [lo, hi] along one axis whose window (no dilation) holds input
    coordinate s: ceil((s + P - K + 1) / S) to floor((s + P) / S), clipped to [0, OUT)."""
    return max(0, (s + P - K + S) // S), min(OUT - 1, (s + P) // S)


# --- kernels ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _max_forward_kernel(dtype: np.dtype):
    zero = dtype.type(0)

    @cuda.jit
    def max_pool_forward_kernel(x, y, idx, geo, total):
        # Each thread computes output elements y[p, od, oh, ow] and idx (grid-stride over the
        # flat output): the first maximum of the window's in-bounds taps in scan order, a NaN
        # counting as one.
        (P, D, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW) = geo
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < total:
            p, od, oh, ow = _split(i, OD, OH, OW)
            plane = p * (D * H * W)
            d0, d1 = _taps(od, SD, PD, KD, DD, D)
            h0, h1 = _taps(oh, SH, PH, KH, DH, H)
            w0, w1 = _taps(ow, SW, PW, KW, DW, W)
            best = zero
            best_at = -1
            for d in range(d0, d1, DD):
                for h in range(h0, h1, DH):
                    for w in range(w0, w1, DW):
                        at = (d * H + h) * W + w
                        v = x[plane + at]
                        if best_at < 0 or v > best or v != v:
                            best = v
                            best_at = at
            y[i] = best
            idx[i] = best_at
            i += cuda.gridDim.x * cuda.blockDim.x

    return max_pool_forward_kernel


@functools.lru_cache(maxsize=None)
def _max_reach_kernel(in_shared: bool):
    BIG = np.int32(np.iinfo(np.int32).max)

    @cuda.jit
    def max_pool_reach_kernel(idx, reach, geo, total):
        # Each thread takes output elements o (grid-stride over the flat output) and widens,
        # per axis, the output-coordinate range [first, last] recorded for the input coordinate
        # idx[o] lies at: reach = (first_d, first_h, first_w, last_d, last_h, last_w). Per block
        # in shared memory, then merged into reach; integer min/max, so the result is exact.
        (P, D, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW) = geo
        span = D + H + W
        plane_size = D * H * W
        table = reach
        if in_shared:
            table = cuda.shared.array(0, int32)
            k = cuda.threadIdx.x
            while k < span:
                table[k] = BIG
                table[span + k] = -1
                k += cuda.blockDim.x
            cuda.syncthreads()
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < total:
            at = idx[i]
            if 0 <= at < plane_size:  # -1 (empty window) and stray values name no input
                _, od, oh, ow = _split(i, OD, OH, OW)
                _, d, h, w = _split(at, D, H, W)
                h += D
                w += D + H
                cuda.atomic.min(table, d, int32(od))
                cuda.atomic.max(table, span + d, int32(od))
                cuda.atomic.min(table, h, int32(oh))
                cuda.atomic.max(table, span + h, int32(oh))
                cuda.atomic.min(table, w, int32(ow))
                cuda.atomic.max(table, span + w, int32(ow))
            i += cuda.gridDim.x * cuda.blockDim.x
        if in_shared:
            cuda.syncthreads()
            k = cuda.threadIdx.x
            while k < span:
                if table[span + k] >= 0:
                    cuda.atomic.min(reach, k, table[k])
                    cuda.atomic.max(reach, span + k, table[span + k])
                k += cuda.blockDim.x

    return max_pool_reach_kernel


@functools.lru_cache(maxsize=None)
def _max_backward_kernel(dtype: np.dtype):
    zero = dtype.type(0)

    @cuda.jit
    def max_pool_backward_kernel(gy, idx, reach, gx, geo, total):
        # Each thread computes input gradients gx[p, d, h, w] (grid-stride over the flat input):
        # the sum, in output order, of gy over the windows whose idx names (d, h, w); only
        # output coordinates in reach[d], reach[h], reach[w] can, so only those are visited.
        (P, D, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW) = geo
        span = D + H + W
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while j < total:
            p, d, h, w = _split(j, D, H, W)
            out_plane = p * (OD * OH * OW)
            at = (d * H + h) * W + w
            total_g = zero
            for od in range(reach[d], reach[span + d] + 1):
                for oh in range(reach[D + h], reach[span + D + h] + 1):
                    for ow in range(reach[D + H + w], reach[span + D + H + w] + 1):
                        o = out_plane + (od * OH + oh) * OW + ow
                        if idx[o] == at:
                            total_g += gy[o]
            gx[j] = total_g
            j += cuda.gridDim.x * cuda.blockDim.x

    return max_pool_backward_kernel


@functools.lru_cache(maxsize=None)
def _avg_forward_kernel(dtype: np.dtype):
    zero = dtype.type(0)

    @cuda.jit
    def avg_pool_forward_kernel(x, divisor, y, geo, total):
        # Each thread computes output elements y[p, od, oh, ow] (grid-stride over the flat
        # output): the window's in-bounds sum over divisor[od, oh, ow].
        (P, D, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW) = geo
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < total:
            p, od, oh, ow = _split(i, OD, OH, OW)
            plane = p * (D * H * W)
            d0, d1 = _taps(od, SD, PD, KD, 1, D)
            h0, h1 = _taps(oh, SH, PH, KH, 1, H)
            w0, w1 = _taps(ow, SW, PW, KW, 1, W)
            window = zero
            for d in range(d0, d1):
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        window += x[plane + (d * H + h) * W + w]
            y[i] = window / divisor[(od * OH + oh) * OW + ow]
            i += cuda.gridDim.x * cuda.blockDim.x

    return avg_pool_forward_kernel


@functools.lru_cache(maxsize=None)
def _avg_backward_kernel(dtype: np.dtype):
    zero = dtype.type(0)

    @cuda.jit
    def avg_pool_backward_kernel(gy, divisor, gx, geo, total):
        # Each thread computes input gradients gx[p, d, h, w] (grid-stride over the flat input):
        # the sum of gy / divisor over the windows holding (d, h, w).
        (P, D, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW) = geo
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while j < total:
            p, d, h, w = _split(j, D, H, W)
            out_plane = p * (OD * OH * OW)
            od_lo, od_hi = _covering(d, PD, KD, SD, OD)
            oh_lo, oh_hi = _covering(h, PH, KH, SH, OH)
            ow_lo, ow_hi = _covering(w, PW, KW, SW, OW)
            total_g = zero
            for od in range(od_lo, od_hi + 1):
                for oh in range(oh_lo, oh_hi + 1):
                    for ow in range(ow_lo, ow_hi + 1):
                        o = (od * OH + oh) * OW + ow
                        total_g += gy[out_plane + o] / divisor[o]
            gx[j] = total_g
            j += cuda.gridDim.x * cuda.blockDim.x

    return avg_pool_backward_kernel


def max_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints, dilation: Ints | None = None,
                     ceil_mode: bool = False):
    """x (N, C, *S) -> (y, idx), both (N, C, *O); idx (int64) is the flat index, within one
    (n, c) plane of the unpadded input, of the window's first maximum (padding never wins)."""
    geo = _geometry(x.shape, kernel, stride, padding, dilation, ceil_mode)
    shape = _out_shape(x.shape, geo)
    y = rt.empty(shape, x.dtype, like=x)
    idx = rt.empty(shape, np.int64, like=x)
    if y.size:
        rt.launch(_max_forward_kernel(np.dtype(x.dtype)), *_grid(y.size),
                  rt.flat(x), y.reshape(-1), idx.reshape(-1), geo, y.size)
    return y, idx


def _reach_from_geometry(geo) -> np.ndarray:
    """Host reach table from the window geometry: per axis and input coordinate s, the output
    coordinates [ceil((s + P - dilation * (K - 1)) / S), floor((s + P) / S)] (clipped) whose
    window can hold s."""
    size, kernel, stride, padding = geo[1:4], geo[4:7], geo[7:10], geo[10:13]
    dilation, out = geo[13:16], geo[16:19]
    first, last = [], []
    for n, k, st, p, dl, o in zip(size, kernel, stride, padding, dilation, out):
        s = np.arange(n)
        first.append(np.maximum(0, (s + p - dl * (k - 1) + st - 1) // st))
        last.append(np.minimum(o - 1, (s + p) // st))
    return np.concatenate(first + last).astype(np.int32)


_SHARED_REACH_BYTES = 32 * 1024  # per-block reach table limit (else atomics go to global)


def _infer_reach(idx, geo):
    """Device reach table from idx itself (see max_pool_reach_kernel)."""
    span = sum(geo[1:4])
    reach = rt.full(2 * span, -1, np.int32, like=idx)
    reach[:span] = np.iinfo(np.int32).max
    in_shared = 8 * span <= _SHARED_REACH_BYTES
    blocks, threads = _grid(idx.size)
    rt.launch(_max_reach_kernel(in_shared), min(blocks, 256), threads,
              rt.flat(idx), reach, geo, idx.size, shared_bytes=8 * span if in_shared else 0)
    return reach


def max_pool_backward(gy, idx, x_shape: Ints, *, kernel: Ints | None = None,
                      stride: Ints | None = None, padding: Ints | None = None,
                      dilation: Ints | None = None):
    """gy, idx (N, C, *O) -> gx (x_shape); each gy element goes to the input its idx names.

    A gather: each input element sums, in output order, the gy of the windows whose idx names
    it. Which output coordinates to visit comes from the window geometry when ``kernel``,
    ``stride`` and ``padding`` (and ``dilation``) are given (optional, beyond the contract),
    else from a first pass over idx (integer atomics, exact).
    """
    x_shape = tuple(int(s) for s in x_shape)
    nd = len(x_shape) - 2
    out = tuple(int(s) for s in gy.shape[2:])
    gx = rt.empty(x_shape, gy.dtype, like=gy)
    if gx.size == 0:
        return gx
    if gy.size == 0:
        gx[...] = 0
        return gx
    # Only sizes matter to the reach pass and the gather; the window fields are placeholders.
    geo = _geometry(x_shape, (1,) * nd, (1,) * nd, (0,) * nd)
    geo = geo[:_GEO - 3] + (1,) * (3 - nd) + out
    if kernel is None:
        reach = _infer_reach(idx, geo)
    else:
        geo = _geometry(x_shape, kernel, stride, padding, dilation)[:_GEO - 3] + geo[_GEO - 3:]
        reach = rt.cached_table(("max_pool_reach",) + geo[1:], lambda: _reach_from_geometry(geo),
                                like=gy)
    rt.launch(_max_backward_kernel(np.dtype(gy.dtype)), *_grid(gx.size),
              rt.flat(gy), rt.flat(idx), reach, gx.reshape(-1), geo, gx.size)
    return gx


def _avg_setup(x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints, ceil_mode: bool,
               count_include_pad: bool, divisor_override: int | None, like):
    """Geometry and the device divisor map (flat over O) of average pooling."""
    geo = _geometry(x_shape, kernel, stride, padding, None, ceil_mode)
    key = ("avg_pool_divisor", np.dtype(like.dtype).str, count_include_pad, divisor_override,
           *geo[1:])

    def build():
        divisor = avg_pool_divisor(geo[1:4], geo[4:7], geo[7:10], geo[10:13], geo[16:19],
                                   count_include_pad, divisor_override)
        return divisor.reshape(-1).astype(like.dtype)

    return geo, rt.cached_table(key, build, like=like)


def avg_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints, ceil_mode: bool = False,
                     count_include_pad: bool = True, divisor_override: int | None = None):
    """x (N, C, *S) -> y (N, C, *O); each window's in-bounds sum over its divisor."""
    geo, divisor = _avg_setup(x.shape, kernel, stride, padding, ceil_mode, count_include_pad,
                              divisor_override, x)
    y = rt.empty(_out_shape(x.shape, geo), x.dtype, like=x)
    if y.size:
        rt.launch(_avg_forward_kernel(np.dtype(x.dtype)), *_grid(y.size),
                  rt.flat(x), divisor, y.reshape(-1), geo, y.size)
    return y


def avg_pool_backward(gy, x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints,
                      ceil_mode: bool = False, count_include_pad: bool = True,
                      divisor_override: int | None = None):
    """gy (N, C, *O) -> gx (x_shape = (N, C, *S))."""
    x_shape = tuple(int(s) for s in x_shape)
    geo, divisor = _avg_setup(x_shape, kernel, stride, padding, ceil_mode, count_include_pad,
                              divisor_override, gy)
    gx = rt.empty(x_shape, gy.dtype, like=gy)
    if gx.size:
        rt.launch(_avg_backward_kernel(np.dtype(gy.dtype)), *_grid(gx.size),
                  rt.flat(gy), divisor, gx.reshape(-1), geo, gx.size)
    return gx
