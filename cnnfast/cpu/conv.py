"""Fast CPU convolution (2D and 3D): forward, backward data, backward weight, bias.

Algorithms, chosen per call from the shapes:

- pointwise: a 1x1 convolution with stride 1 and no padding over a large enough image is a
  plain matrix product per sample, ``y[n] = w (K, C) @ x[n] (C, S)``, with no gather at all.
- GEMM (most layers): gather the input into a column matrix (:func:`_im2col.im2col`, Numba,
  parallel), then one BLAS matrix product through NumPy:
  forward ``y = w (K, C*KS) @ cols``, backward-weight ``gw = gy (K, N*O) @ cols^T``,
  backward-data ``gcols = w^T @ gy`` scattered back by :func:`_im2col.col2im_add`. The batch is
  cut into chunks whose column matrix stays a few megabytes (it is rebuilt every call into a
  reused buffer), so the gather writes into cache rather than memory.
- direct: a Numba loop nest over (n, k) output planes, for layers whose filters are tiny
  (C/groups * prod(KS) small: the first layer of an image network, depthwise convolutions),
  where a matrix product has nothing to chew on.

2D runs as 3D with a depth of 1 (see :mod:`cnnfast.cpu._im2col`). Every reduction has a fixed
order and every parallel loop owns its outputs, so results are the same bits on every run.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from cnnfast.cpu._im2col import as3d, col2im_add, geometry3, im2col, scratch, valid_range

Ints = tuple[int, ...]

# Elements of one chunk's column matrix (about 4 MiB in float32): large enough for an efficient
# matrix product, small enough to stay in the last-level cache between gather and product.
COLS_BUDGET = 1 << 20
# Filters with at most this many taps per output (C/groups * prod(KS)) run the direct kernel.
DIRECT_MAX_TAPS = 16
# A pointwise layer needs this many positions per sample for per-sample products to pay.
POINTWISE_MIN_POSITIONS = 256


class _Geometry:
    """A convolution's shapes in 3D form (2D has depth 1), the one place they are worked out."""

    def __init__(self, x_shape: Ints, w_shape: Ints, stride: Ints, padding: Ints,
                 dilation: Ints, groups: int):
        self.nd = len(x_shape) - 2
        self.N, self.C = int(x_shape[0]), int(x_shape[1])
        self.K, self.Cg = int(w_shape[0]), int(w_shape[1])
        self.groups = int(groups)
        self.Kg = self.K // self.groups
        self.size = geometry3(x_shape[2:], 1)
        self.ks = geometry3(w_shape[2:], 1)
        self.st = geometry3(stride, 1)
        self.pd = geometry3(padding, 0)
        self.dl = geometry3(dilation, 1)
        self.out = tuple(
            (s + 2 * p - d * (k - 1) - 1) // t + 1
            for s, k, t, p, d in zip(self.size, self.ks, self.st, self.pd, self.dl)
        )
        self.taps = self.Cg * self.ks[0] * self.ks[1] * self.ks[2]

    def y_shape(self) -> Ints:
        return (self.N, self.K) + self.out[3 - self.nd:]

    def x_shape(self) -> Ints:
        return (self.N, self.C) + self.size[3 - self.nd:]

    def w_shape(self) -> Ints:
        return (self.K, self.Cg) + self.ks[3 - self.nd:]

    def pointwise(self) -> bool:
        return (self.ks == (1, 1, 1) and self.st == (1, 1, 1) and self.pd == (0, 0, 0)
                and self.out[0] * self.out[1] * self.out[2] >= POINTWISE_MIN_POSITIONS)

    def direct(self) -> bool:
        return self.taps <= DIRECT_MAX_TAPS

    def chunks(self):
        """(n0, nb, r0, nr): chunks of whole samples, or bands of output rows of one sample."""
        rows = self.out[0] * self.out[1]
        OW = self.out[2]
        per_sample = self.taps * rows * OW
        if per_sample <= COLS_BUDGET:
            nb = max(1, COLS_BUDGET // max(per_sample, 1))
            count = -(-self.N // nb)
            nb = -(-self.N // count)
            for n0 in range(0, self.N, nb):
                yield n0, min(nb, self.N - n0), 0, rows
        else:
            nr = max(1, COLS_BUDGET // (self.taps * OW))
            count = -(-rows // nr)
            nr = -(-rows // count)
            for n in range(self.N):
                for r0 in range(0, rows, nr):
                    yield n, 1, r0, min(nr, rows - r0)

    def gather_args(self):
        return self.ks, self.st, self.pd, self.dl, self.out


# --- forward --------------------------------------------------------------------------------------

def conv_forward(x, w, stride: Ints, padding: Ints, dilation: Ints, groups: int):
    """x (N, C, *S), w (K, C // groups, *KS) -> y (N, K, *O), cross-correlation like PyTorch."""
    geo = _Geometry(x.shape, w.shape, stride, padding, dilation, groups)
    x5 = as3d(x)
    w5 = as3d(np.asarray(w, dtype=x5.dtype))
    y5 = np.empty((geo.N, geo.K) + geo.out, dtype=x5.dtype)
    if geo.N * geo.K == 0 or y5.size == 0:
        return np.zeros(geo.y_shape(), dtype=x5.dtype)
    if geo.pointwise() and geo.groups == 1:
        np.matmul(w5.reshape(geo.K, geo.C), x5.reshape(geo.N, geo.C, -1),
                  out=y5.reshape(geo.N, geo.K, -1))
    elif geo.direct():
        _direct_forward(x5, w5, geo.st, geo.pd, geo.dl, y5)
    else:
        _gemm_forward(x5, w5, geo, y5)
    return y5.reshape(geo.y_shape())


def _gemm_forward(x5, w5, geo: _Geometry, y5) -> None:
    w2 = w5.reshape(geo.K, geo.taps)
    OW = geo.out[2]
    y4 = y5.reshape(geo.N, geo.K, geo.out[0] * geo.out[1], OW)
    for n0, nb, r0, nr in geo.chunks():
        ncols = nb * nr * OW
        cols = scratch("cols", (geo.taps, ncols), x5.dtype)
        res = scratch("gemm", (geo.Kg, ncols), x5.dtype)
        for g in range(geo.groups):
            im2col(x5, n0, nb, r0, nr, g * geo.Cg, geo.Cg, *geo.gather_args(), cols.reshape(-1))
            k = slice(g * geo.Kg, (g + 1) * geo.Kg)
            np.matmul(w2[k], cols, out=res)
            y4[n0:n0 + nb, k, r0:r0 + nr] = res.reshape(geo.Kg, nb, nr, OW).transpose(1, 0, 2, 3)


@njit(parallel=True, cache=True)
def _direct_forward(x, w, st, pd, dl, y):
    """y (N, K, OD, OH, OW) from x (N, C, D, H, W), w (K, C/groups, KD, KH, KW): one thread per
    (n, k) output plane, adding one kernel tap at a time over whole output rows."""
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = w.shape
    _, _, OD, OH, OW = y.shape
    SD, SH, SW = st
    PD, PH, PW = pd
    DD, DH, DW = dl
    Kg = K // (C // Cg)
    xf = x.reshape(-1)
    wf = w.reshape(-1)
    yf = y.reshape(-1)
    plane_in = D * H * W
    plane_out = OD * OH * OW
    taps = Cg * KD * KH * KW
    for task in prange(N * K):
        n = task // K
        k = task - n * K
        g = k // Kg
        ybase = task * plane_out
        for i in range(plane_out):
            yf[ybase + i] = 0
        for t in range(taps):
            c = t // (KD * KH * KW)
            kk = t - c * (KD * KH * KW)
            kd = kk // (KH * KW)
            kh = (kk // KW) % KH
            kw = kk % KW
            wv = wf[k * taps + t]
            lo, hi = valid_range(W, OW, SW, PW, kw * DW)
            xbase = (n * C + g * Cg + c) * plane_in + kw * DW - PW
            for od in range(OD):
                i_d = od * SD - PD + kd * DD
                if i_d < 0 or i_d >= D:
                    continue
                for oh in range(OH):
                    i_h = oh * SH - PH + kh * DH
                    if i_h < 0 or i_h >= H:
                        continue
                    src = xbase + (i_d * H + i_h) * W
                    dst = ybase + (od * OH + oh) * OW
                    if SW == 1:
                        for ow in range(lo, hi):
                            yf[dst + ow] += wv * xf[src + ow]
                    else:
                        for ow in range(lo, hi):
                            yf[dst + ow] += wv * xf[src + ow * SW]


# --- backward data --------------------------------------------------------------------------------

def conv_backward_data(gy, w, x_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                       groups: int):
    """gy (N, K, *O), w (K, C // groups, *KS) -> gx (N, C, *S) = x_shape."""
    geo = _Geometry(tuple(x_shape), w.shape, stride, padding, dilation, groups)
    gy5 = as3d(gy)
    w5 = as3d(np.asarray(w, dtype=gy5.dtype))
    if geo.pointwise() and geo.groups == 1:
        gx5 = np.empty((geo.N, geo.C) + geo.size, dtype=gy5.dtype)
        np.matmul(w5.reshape(geo.K, geo.C).T, gy5.reshape(geo.N, geo.K, -1),
                  out=gx5.reshape(geo.N, geo.C, -1))
        return gx5.reshape(geo.x_shape())
    gx5 = np.zeros((geo.N, geo.C) + geo.size, dtype=gy5.dtype)
    if gy5.size == 0 or gx5.size == 0:
        return gx5.reshape(geo.x_shape())
    if geo.direct():
        _direct_backward_data(gy5, w5, geo.st, geo.pd, geo.dl, gx5)
    else:
        _gemm_backward_data(gy5, w5, geo, gx5)
    return gx5.reshape(geo.x_shape())


def _transposed_chunk(gy5, geo: _Geometry, g: int, n0: int, nb: int, r0: int, nr: int):
    """gy's chunk of group g as a (K/groups, nb * nr * OW) matrix (a reused buffer)."""
    OW = geo.out[2]
    gy4 = gy5.reshape(geo.N, geo.K, geo.out[0] * geo.out[1], OW)
    gyt = scratch("gyt", (geo.Kg, nb, nr, OW), gy5.dtype)
    k = slice(g * geo.Kg, (g + 1) * geo.Kg)
    gyt[...] = gy4[n0:n0 + nb, k, r0:r0 + nr].transpose(1, 0, 2, 3)
    return gyt.reshape(geo.Kg, nb * nr * OW)


def _gemm_backward_data(gy5, w5, geo: _Geometry, gx5) -> None:
    w2 = w5.reshape(geo.K, geo.taps)
    for n0, nb, r0, nr in geo.chunks():
        ncols = nb * nr * geo.out[2]
        gcols = scratch("cols", (geo.taps, ncols), gy5.dtype)
        for g in range(geo.groups):
            gyt = _transposed_chunk(gy5, geo, g, n0, nb, r0, nr)
            np.matmul(w2[g * geo.Kg:(g + 1) * geo.Kg].T, gyt, out=gcols)
            col2im_add(gcols.reshape(-1), n0, nb, r0, nr, g * geo.Cg, geo.Cg,
                       *geo.gather_args(), gx5)


@njit(parallel=True, cache=True)
def _direct_backward_data(gy, w, st, pd, dl, gx):
    """gx (N, C, D, H, W) += the adjoint of :func:`_direct_forward`: one thread per (n, c)
    input plane, adding one (k, tap) at a time over whole output rows."""
    N, C, D, H, W = gx.shape
    K, Cg, KD, KH, KW = w.shape
    _, _, OD, OH, OW = gy.shape
    SD, SH, SW = st
    PD, PH, PW = pd
    DD, DH, DW = dl
    Kg = K // (C // Cg)
    gyf = gy.reshape(-1)
    wf = w.reshape(-1)
    gxf = gx.reshape(-1)
    plane_in = D * H * W
    plane_out = OD * OH * OW
    KK = KD * KH * KW
    for task in prange(N * C):
        n = task // C
        ci = task - n * C
        g = ci // Cg
        c = ci - g * Cg
        xbase = task * plane_in
        for k in range(g * Kg, (g + 1) * Kg):
            ybase = (n * K + k) * plane_out
            for kk in range(KK):
                kd = kk // (KH * KW)
                kh = (kk // KW) % KH
                kw = kk % KW
                wv = wf[(k * Cg + c) * KK + kk]
                lo, hi = valid_range(W, OW, SW, PW, kw * DW)
                shift = kw * DW - PW
                for od in range(OD):
                    i_d = od * SD - PD + kd * DD
                    if i_d < 0 or i_d >= D:
                        continue
                    for oh in range(OH):
                        i_h = oh * SH - PH + kh * DH
                        if i_h < 0 or i_h >= H:
                            continue
                        dst = xbase + (i_d * H + i_h) * W + shift
                        src = ybase + (od * OH + oh) * OW
                        if SW == 1:
                            for ow in range(lo, hi):
                                gxf[dst + ow] += wv * gyf[src + ow]
                        else:
                            for ow in range(lo, hi):
                                gxf[dst + ow * SW] += wv * gyf[src + ow]


# --- backward weight ------------------------------------------------------------------------------

def conv_backward_weight(gy, x, w_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                         groups: int):
    """gy (N, K, *O), x (N, C, *S) -> gw (K, C // groups, *KS) = w_shape."""
    geo = _Geometry(x.shape, tuple(w_shape), stride, padding, dilation, groups)
    gy5 = as3d(gy)
    x5 = as3d(np.asarray(x, dtype=gy5.dtype))
    gw5 = np.zeros((geo.K, geo.Cg) + geo.ks, dtype=gy5.dtype)
    if gy5.size == 0 or x5.size == 0:
        return gw5.reshape(geo.w_shape())
    if geo.direct():
        _direct_backward_weight(gy5, x5, geo.st, geo.pd, geo.dl, gw5)
    else:
        _gemm_backward_weight(gy5, x5, geo, gw5)
    return gw5.reshape(geo.w_shape())


def _gemm_backward_weight(gy5, x5, geo: _Geometry, gw5) -> None:
    gw2 = gw5.reshape(geo.K, geo.taps)
    first = True
    for n0, nb, r0, nr in geo.chunks():
        ncols = nb * nr * geo.out[2]
        cols = scratch("cols", (geo.taps, ncols), x5.dtype)
        part = scratch("gemm", (geo.Kg, geo.taps), x5.dtype)
        for g in range(geo.groups):
            im2col(x5, n0, nb, r0, nr, g * geo.Cg, geo.Cg, *geo.gather_args(), cols.reshape(-1))
            gyt = _transposed_chunk(gy5, geo, g, n0, nb, r0, nr)
            k = slice(g * geo.Kg, (g + 1) * geo.Kg)
            if first:
                np.matmul(gyt, cols.T, out=gw2[k])
            else:
                np.matmul(gyt, cols.T, out=part)
                gw2[k] += part
        first = False


@njit(parallel=True, cache=True)
def _direct_backward_weight(gy, x, st, pd, dl, gw):
    """gw (K, C/groups, KD, KH, KW): one thread per (k, c) filter slice, each tap a dot product
    of gy's (n, k) planes with the input rows it met, summed over n in order."""
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = gw.shape
    _, _, OD, OH, OW = gy.shape
    SD, SH, SW = st
    PD, PH, PW = pd
    DD, DH, DW = dl
    Kg = K // (C // Cg)
    gyf = gy.reshape(-1)
    xf = x.reshape(-1)
    gwf = gw.reshape(-1)
    plane_in = D * H * W
    plane_out = OD * OH * OW
    KK = KD * KH * KW
    for task in prange(K * Cg):
        k = task // Cg
        c = task - k * Cg
        ci = (k // Kg) * Cg + c
        for kk in range(KK):
            kd = kk // (KH * KW)
            kh = (kk // KW) % KH
            kw = kk % KW
            lo, hi = valid_range(W, OW, SW, PW, kw * DW)
            shift = kw * DW - PW
            acc = 0.0
            for n in range(N):
                xbase = (n * C + ci) * plane_in + shift
                ybase = (n * K + k) * plane_out
                for od in range(OD):
                    i_d = od * SD - PD + kd * DD
                    if i_d < 0 or i_d >= D:
                        continue
                    for oh in range(OH):
                        i_h = oh * SH - PH + kh * DH
                        if i_h < 0 or i_h >= H:
                            continue
                        src = xbase + (i_d * H + i_h) * W
                        dst = ybase + (od * OH + oh) * OW
                        if SW == 1:
                            for ow in range(lo, hi):
                                acc += gyf[dst + ow] * xf[src + ow]
                        else:
                            for ow in range(lo, hi):
                                acc += gyf[dst + ow] * xf[src + ow * SW]
            gwf[task * KK + kk] = acc


# --- bias -----------------------------------------------------------------------------------------

def bias_add(y, b):
    """y (N, K, *O) + b (K,) broadcast over axis 1 -> a new (N, K, *O) array."""
    y3 = np.ascontiguousarray(y).reshape(y.shape[0], y.shape[1], -1)
    out = np.empty(y3.shape, dtype=y3.dtype)
    _bias_add(y3, np.asarray(b, dtype=y3.dtype), out)
    return out.reshape(y.shape)


def bias_grad(gy):
    """gy (N, K, *O) -> gb (K,): gy summed over every axis but 1 (float64 accumulators)."""
    g3 = np.ascontiguousarray(gy).reshape(gy.shape[0], gy.shape[1], -1)
    gb = np.empty(gy.shape[1], dtype=g3.dtype)
    _bias_grad(g3, gb)
    return gb


@njit(parallel=True, cache=True)
def _bias_add(y, b, out):
    N, K, S = y.shape
    for task in prange(N * K):
        n = task // K
        k = task - n * K
        bk = b[k]
        for s in range(S):
            out[n, k, s] = y[n, k, s] + bk


@njit(parallel=True, cache=True)
def _bias_grad(gy, gb):
    N, K, S = gy.shape
    for k in prange(K):
        total = 0.0
        for n in range(N):
            for s in range(S):
                total += gy[n, k, s]
        gb[k] = total
