"""im2col / col2im gathers for the fast CPU convolution.

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

import numpy as np
from numba import njit

from cnnfast.shapes import lift3

Geometry = tuple[int, int, int]


def as3d(x: np.ndarray) -> np.ndarray:
    """A C-contiguous (N, C, D, H, W) view (or copy) of an (N, C, H, W) or (N, C, D, H, W) array."""
    x = np.ascontiguousarray(x)
    if x.ndim == 4:
        return x.reshape(x.shape[:2] + (1,) + x.shape[2:])
    return x


geometry3 = lift3  # pad a 2-tuple of spatial parameters to 3 (depth first) with ``fill``


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
def tap_maps(size, ks, st, pd, dl, out):
    """For each kernel tap kk and each output position p (flat over (od, oh, ow)): the flat
    input position within one plane that the tap meets, or -1 where it meets padding; and a
    uint8 copy of ``maps >= 0`` for the vectorised stride-1 loops. Worked out once per call."""
    D, H, W = size
    KD, KH, KW = ks
    SD, SH, SW = st
    PD, PH, PW = pd
    DD, DH, DW = dl
    OD, OH, OW = out
    maps = np.empty((KD * KH * KW, OD * OH * OW), dtype=np.int64)
    valid = np.empty((KD * KH * KW, OD * OH * OW), dtype=np.uint8)
    for kk in range(KD * KH * KW):
        kd = kk // (KH * KW)
        kh = (kk // KW) % KH
        kw = kk % KW
        p = 0
        for od in range(OD):
            i_d = od * SD - PD + kd * DD
            for oh in range(OH):
                i_h = oh * SH - PH + kh * DH
                for ow in range(OW):
                    i_w = ow * SW - PW + kw * DW
                    inside = 0 <= i_d < D and 0 <= i_h < H and 0 <= i_w < W
                    maps[kk, p] = (i_d * H + i_h) * W + i_w if inside else -1
                    valid[kk, p] = 1 if inside else 0
                    p += 1
    return maps, valid


def is_same(size, st, out) -> bool:
    """Stride 1 and output size = input size: a kernel tap shifts a whole plane by a constant."""
    return tuple(st) == (1, 1, 1) and tuple(out) == tuple(size)


@njit(nogil=True, cache=True, inline="always")
def tap_offset(kk, size, ks, pd, dl):
    """In a stride-1 'same' convolution, output position p meets input position p + offset
    under kernel tap kk (flat, within one plane)."""
    D, H, W = size
    KD, KH, KW = ks
    kd = kk // (KH * KW)
    kh = (kk // KW) % KH
    kw = kk % KW
    return ((kd * dl[0] - pd[0]) * H + kh * dl[1] - pd[1]) * W + kw * dl[2] - pd[2]


@njit(nogil=True, cache=True)
def im2col(x, n0, nb, r0, nr, c0, cg, ks, pd, dl, OW, maps, valid, same, cols):
    """Fill ``cols`` (flat: cg * prod(ks) rows of nb * nr * OW columns) from x (N, C, D, H, W);
    see the module docstring. ``maps, valid`` come from :func:`tap_maps`; ``same`` is
    :func:`is_same`; ``ks, pd, dl`` are (D, H, W) triples of kernel, padding, dilation."""
    _, C, D, H, W = x.shape
    KK = ks[0] * ks[1] * ks[2]
    xf = x.reshape(-1)
    zero = zero_of(xf)
    plane = D * H * W
    span = nr * OW
    p0 = r0 * OW
    for row in range(cg * KK):
        c = row // KK
        kk = row - c * KK
        offset = tap_offset(kk, (D, H, W), ks, pd, dl)
        for b in range(nb):
            base = ((n0 + b) * C + c0 + c) * plane
            start = row * nb * span + b * span
            seg = cols[start:start + span]
            if same:
                # The segment is a run of the input plane shifted by a constant: copy it in one
                # go, zeroing what falls outside the input (or wraps to the next row).
                first = min(span, max(0, -offset - p0))
                last = max(first, min(span, plane - offset - p0))
                _zero(seg, 0, first)
                _copy_valid(seg, first, xf, base + p0 + first + offset, valid[kk, p0:],
                            last - first, zero)
                _zero(seg, last, span - last)
            else:
                # Gather through the tap's index map; -1 reads element 0 and stores a zero.
                src = xf[base:base + plane]
                m = maps[kk, p0:p0 + span]
                for i in range(span):
                    j = m[i]
                    v = src[max(j, 0)]
                    seg[i] = v if j >= 0 else zero


@njit(nogil=True, cache=True)
def col2im_add(cols, n0, nb, r0, nr, c0, cg, ks, pd, dl, OW, maps, valid, same, gx):
    """The adjoint of :func:`im2col`: add every ``cols`` entry into the gx (N, C, D, H, W)
    element it was gathered from, one (sample, channel) plane at a time, kernel taps in
    order, so each gx element's sum has a fixed order."""
    _, C, D, H, W = gx.shape
    KK = ks[0] * ks[1] * ks[2]
    gf = gx.reshape(-1)
    zero = zero_of(gf)
    plane = D * H * W
    span = nr * OW
    p0 = r0 * OW
    for b in range(nb):
        for c in range(cg):
            base = ((n0 + b) * C + c0 + c) * plane
            dst = gf[base:base + plane]
            for kk in range(KK):
                start = (c * KK + kk) * nb * span + b * span
                seg = cols[start:start + span]
                if same:
                    offset = tap_offset(kk, (D, H, W), ks, pd, dl)
                    first = min(span, max(0, -offset - p0))
                    last = max(first, min(span, plane - offset - p0))
                    _add_valid(dst, p0 + first + offset, seg, first, valid[kk, p0:],
                               last - first, zero)
                else:
                    m = maps[kk, p0:p0 + span]
                    for i in range(span):
                        j = m[i]
                        if j >= 0:
                            dst[j] += seg[i]
