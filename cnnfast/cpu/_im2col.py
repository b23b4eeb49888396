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
from numba import njit

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


@njit(nogil=True, cache=True, inline="always")
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


@njit(nogil=True, cache=True, inline="always")
def zero_of(a):
    """0 in a's dtype: a bare 0 in ``x if c else 0`` would make the result float64 and
    keep LLVM from vectorising float32 loops."""
    return np.zeros(1, dtype=a.dtype)[0]


@njit(nogil=True, cache=True, inline="always")
def _copy_valid(dst, d0, src, s0, valid, n, zero):
    """dst[d0 + i] = src[s0 + i] where valid[d0 + i], else 0, for i < n. Through views indexed
    from 0, so the loop has no negative-index checks and LLVM vectorises it (a select, not a
    multiply by the mask, so that an inf or NaN next to the padding stays out)."""
    d = dst[d0:d0 + n]
    s = src[s0:s0 + n]
    m = valid[d0:d0 + n]
    for i in range(n):
        d[i] = s[i] if m[i] else zero


@njit(nogil=True, cache=True, inline="always")
def _add_valid(dst, d0, src, s0, valid, n, zero):
    """dst[d0 + i] += src[s0 + i] where valid[s0 + i], for i < n (vectorised like
    :func:`_copy_valid`)."""
    d = dst[d0:d0 + n]
    s = src[s0:s0 + n]
    m = valid[s0:s0 + n]
    for i in range(n):
        d[i] += s[i] if m[i] else zero


@njit(nogil=True, cache=True, inline="always")
def _zero(dst, d0, n):
    for i in range(n):
        dst[d0 + i] = 0


@njit(nogil=True, cache=True)
def _index_maps(size, r0, nr, ks, st, pd, dl, out):
    """For each kernel tap kk and each output position p of rows r0..r0+nr, the flat input
    position (within one plane) that the tap meets, or -1 where it meets padding."""
    D, H, W = size
    KD, KH, KW = ks
    SD, SH, SW = st
    PD, PH, PW = pd
    DD, DH, DW = dl
    OD, OH, OW = out
    maps = np.empty((KD * KH * KW, nr * OW), dtype=np.int64)
    for kk in range(KD * KH * KW):
        kd = kk // (KH * KW)
        kh = (kk // KW) % KH
        kw = kk % KW
        for j in range(nr):
            od = (r0 + j) // OH
            oh = r0 + j - od * OH
            i_d = od * SD - PD + kd * DD
            i_h = oh * SH - PH + kh * DH
            for ow in range(OW):
                i_w = ow * SW - PW + kw * DW
                inside = 0 <= i_d < D and 0 <= i_h < H and 0 <= i_w < W
                maps[kk, j * OW + ow] = (i_d * H + i_h) * W + i_w if inside else -1
    return maps


@njit(nogil=True, cache=True)
def _valid_masks(maps):
    """1 where an index map meets the input, 0 where it meets padding (uint8, maps' shape)."""
    valid = np.empty(maps.shape, dtype=np.uint8)
    for kk in range(maps.shape[0]):
        for p in range(maps.shape[1]):
            valid[kk, p] = 1 if maps[kk, p] >= 0 else 0
    return valid


@njit(nogil=True, cache=True)
def _is_same(size, st, out):
    """Stride 1 and output size = input size: a kernel tap shifts a whole plane by a constant."""
    return st[0] == 1 and st[1] == 1 and st[2] == 1 and out[0] == size[0] and \
        out[1] == size[1] and out[2] == size[2]


@njit(nogil=True, cache=True)
def im2col(x, n0, nb, r0, nr, c0, cg, ks, st, pd, dl, out, cols, per_sample):
    """Fill ``cols`` from x (N, C, D, H, W); see the module docstring. ``ks, st, pd, dl, out``
    are (D, H, W) triples of kernel, stride, padding, dilation and output size. ``cols`` is
    flat: rows (c, kd, kh, kw) of nb * nr * OW columns, or with ``per_sample`` nb matrices of
    cg * KD * KH * KW rows and nr * OW columns, one per sample."""
    _, C, D, H, W = x.shape
    KD, KH, KW = ks
    PD, PH, PW = pd
    DD, DH, DW = dl
    OD, OH, OW = out
    KK = KD * KH * KW
    xf = x.reshape(-1)
    zero = zero_of(xf)
    plane = D * H * W
    span = nr * OW
    row_stride, sample_stride = (span, cg * KK * span) if per_sample else (nb * span, span)
    same = _is_same((D, H, W), st, out)
    maps = _index_maps((D, H, W), r0, nr, ks, st, pd, dl, out)
    valid = _valid_masks(maps)
    for row in range(cg * KK):
        c = row // KK
        kk = row - c * KK
        kd = kk // (KH * KW)
        kh = (kk // KW) % KH
        kw = kk % KW
        for b in range(nb):
            base = ((n0 + b) * C + c0 + c) * plane
            start = row * row_stride + b * sample_stride
            seg = cols[start:start + span]
            if same:
                # Each segment is a run of the input plane shifted by a constant: copy it in
                # one go, then zero what fell outside the input (or wrapped to the next row).
                i_d0 = kd * DD - PD
                i_h0 = kh * DH - PH
                offset = (i_d0 * H + i_h0) * W + kw * DW - PW
                p0 = r0 * OW
                first = min(span, max(0, -offset - p0))
                last = max(first, min(span, plane - offset - p0))
                _zero(seg, 0, first)
                _copy_valid(seg, first, xf, base + p0 + first + offset, valid[kk], last - first,
                            zero)
                _zero(seg, last, span - last)
            else:
                # Gather through the tap's index map; -1 reads element 0 and stores a zero.
                src = xf[base:base + plane]
                m = maps[kk]
                for i in range(span):
                    j = m[i]
                    v = src[max(j, 0)]
                    seg[i] = v if j >= 0 else zero


@njit(nogil=True, cache=True)
def col2im_add(cols, n0, nb, r0, nr, c0, cg, ks, st, pd, dl, out, gx, per_sample):
    """The adjoint of :func:`im2col`: add every ``cols`` entry into the gx (N, C, D, H, W)
    element it was gathered from, one (sample, channel) plane at a time, kernel taps in order.
    Overwrites the entries of ``cols`` that fall outside the input with zeros."""
    _, C, D, H, W = gx.shape
    KD, KH, KW = ks
    PD, PH, PW = pd
    DD, DH, DW = dl
    OD, OH, OW = out
    KK = KD * KH * KW
    gf = gx.reshape(-1)
    zero = zero_of(gf)
    plane = D * H * W
    span = nr * OW
    row_stride, sample_stride = (span, cg * KK * span) if per_sample else (nb * span, span)
    same = _is_same((D, H, W), st, out)
    maps = _index_maps((D, H, W), r0, nr, ks, st, pd, dl, out)
    valid = _valid_masks(maps)
    for b in range(nb):
        for c in range(cg):
            base = ((n0 + b) * C + c0 + c) * plane
            dst = gf[base:base + plane]
            for kk in range(KK):
                kd = kk // (KH * KW)
                kh = (kk // KW) % KH
                kw = kk % KW
                start = (c * KK + kk) * row_stride + b * sample_stride
                seg = cols[start:start + span]
                if same:
                    i_d0 = kd * DD - PD
                    i_h0 = kh * DH - PH
                    offset = (i_d0 * H + i_h0) * W + kw * DW - PW
                    p0 = r0 * OW
                    first = min(span, max(0, -offset - p0))
                    last = max(first, min(span, plane - offset - p0))
                    _add_valid(dst, p0 + first + offset, seg, first, valid[kk], last - first, zero)
                else:
                    m = maps[kk]
                    for i in range(span):
                        j = m[i]
                        if j >= 0:
                            dst[j] += seg[i]
