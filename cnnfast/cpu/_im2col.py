"""im2col / col2im gathers for the fast CPU convolution, and per-thread scratch buffers.

Every kernel here works on the 3D form of a convolution: a 2D input (N, C, H, W) is viewed as
(N, C, 1, H, W) with a kernel depth, stride and dilation of 1 and no depth padding, so one
compiled kernel per dtype serves both spatial ranks.

The column matrix of a chunk of the batch has one row per (c, kd, kh, kw) and one column per
output position of the chunk, in (b, od, oh, ow) order::

    cols[(c, kd, kh, kw), (b, r, ow)] = x[n0 + b, c0 + c, id, ih, iw]   (0 outside the input)
    r = od * OH + oh, r0 <= r < r0 + nr
    id = od * SD - PD + kd * DD,  ih = oh * SH - PH + kh * DH,  iw = ow * SW - PW + kw * DW

A chunk is either several whole samples (nr = OD * OH) or a band of output rows of one sample
(nb = 1), so that the column matrix stays a few megabytes however large the input is.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

Geometry = tuple[int, int, int]

_local = threading.local()


def scratch(role: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A C-contiguous work array of ``shape``, reused across calls on this thread.

    One flat buffer per (role, dtype) grows to the largest size asked for; the array returned is
    a view of it, so it is only valid until the next ``scratch`` call with the same role. Never
    hand one to a caller.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    dtype = np.dtype(dtype)
    size = 1
    for s in shape:
        size *= s
    key = (role, dtype)
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buf = buffers[key] = np.empty(max(size, 1), dtype=dtype)
    return buf[:size].reshape(shape)


def release_scratch() -> None:
    """Drop this thread's scratch buffers (they are rebuilt on demand)."""
    _local.buffers = {}


def as3d(x: np.ndarray) -> np.ndarray:
    """A C-contiguous (N, C, D, H, W) view (or copy) of an (N, C, H, W) or (N, C, D, H, W) array."""
    x = np.ascontiguousarray(x)
    if x.ndim == 4:
        return x.reshape(x.shape[:2] + (1,) + x.shape[2:])
    return x


def geometry3(t: tuple[int, ...], fill: int) -> Geometry:
    """Pad a 2-tuple of spatial parameters to 3 (depth first) with ``fill``."""
    t = tuple(int(v) for v in t)
    return (fill,) * (3 - len(t)) + t


@njit(cache=True, inline="always")
def valid_range(size, out, stride, pad, offset):
    """The output positions [lo, hi) whose input position o * stride - pad + offset is in
    [0, size)."""
    lo = 0
    start = pad - offset
    if start > 0:
        lo = (start + stride - 1) // stride
    hi = 0
    last = size - 1 + pad - offset
    if last >= 0:
        hi = last // stride + 1
    if hi > out:
        hi = out
    if lo > hi:
        lo = hi
    return lo, hi


@njit(parallel=True, cache=True)
def im2col(x, n0, nb, r0, nr, c0, cg, ks, st, pd, dl, out, cols):
    """Fill ``cols`` (cg * KD * KH * KW, nb * nr * OW) from x (N, C, D, H, W); see the module
    docstring. ``ks, st, pd, dl, out`` are (D, H, W) triples of kernel, stride, padding,
    dilation and output size. Each row is written by one thread."""
    _, _, D, H, W = x.shape
    KD, KH, KW = ks
    SD, SH, SW = st
    PD, PH, PW = pd
    DD, DH, DW = dl
    OD, OH, OW = out
    KK = KD * KH * KW
    xf = x.reshape(-1)
    ncols = nb * nr * OW
    plane = D * H * W
    for row in prange(cg * KK):
        c = row // KK
        kk = row - c * KK
        kd = kk // (KH * KW)
        kh = (kk // KW) % KH
        kw = kk % KW
        lo, hi = valid_range(W, OW, SW, PW, kw * DW)
        shift = kw * DW - PW
        dst = row * ncols
        for b in range(nb):
            base_nc = ((n0 + b) * x.shape[1] + c0 + c) * plane
            for r in range(r0, r0 + nr):
                od = r // OH
                oh = r - od * OH
                i_d = od * SD - PD + kd * DD
                i_h = oh * SH - PH + kh * DH
                if i_d < 0 or i_d >= D or i_h < 0 or i_h >= H:
                    for ow in range(OW):
                        cols[dst + ow] = 0
                else:
                    src = base_nc + (i_d * H + i_h) * W + shift
                    for ow in range(lo):
                        cols[dst + ow] = 0
                    if SW == 1:
                        for ow in range(lo, hi):
                            cols[dst + ow] = xf[src + ow]
                    else:
                        for ow in range(lo, hi):
                            cols[dst + ow] = xf[src + ow * SW]
                    for ow in range(hi, OW):
                        cols[dst + ow] = 0
                dst += OW


@njit(parallel=True, cache=True)
def col2im_add(cols, n0, nb, r0, nr, c0, cg, ks, st, pd, dl, out, gx):
    """The adjoint of :func:`im2col`: add every ``cols`` entry into the gx (N, C, D, H, W)
    element it was gathered from. Each (b, c) plane of gx is owned by one thread, which adds
    the entries of its kernel offsets in a fixed order, so the result is race-free and the same
    bits on every run and thread count."""
    _, _, D, H, W = gx.shape
    KD, KH, KW = ks
    SD, SH, SW = st
    PD, PH, PW = pd
    DD, DH, DW = dl
    OD, OH, OW = out
    KK = KD * KH * KW
    gf = gx.reshape(-1)
    ncols = nb * nr * OW
    plane = D * H * W
    for task in prange(nb * cg):
        b = task // cg
        c = task - b * cg
        base_nc = ((n0 + b) * gx.shape[1] + c0 + c) * plane
        for kk in range(KK):
            kd = kk // (KH * KW)
            kh = (kk // KW) % KH
            kw = kk % KW
            lo, hi = valid_range(W, OW, SW, PW, kw * DW)
            shift = kw * DW - PW
            src = (c * KK + kk) * ncols + b * nr * OW
            for r in range(r0, r0 + nr):
                od = r // OH
                oh = r - od * OH
                i_d = od * SD - PD + kd * DD
                i_h = oh * SH - PH + kh * DH
                if i_d >= 0 and i_d < D and i_h >= 0 and i_h < H:
                    dst = base_nc + (i_d * H + i_h) * W + shift
                    if SW == 1:
                        for ow in range(lo, hi):
                            gf[dst + ow] += cols[src + ow]
                    else:
                        for ow in range(lo, hi):
                            gf[dst + ow * SW] += cols[src + ow]
                src += OW
