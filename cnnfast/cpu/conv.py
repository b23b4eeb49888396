"""Fast CPU convolution (2D and 3D): forward, backward data, backward weight, bias.

Algorithms, chosen per call from the shapes:

- GEMM (most layers): gather the input into a column matrix (:func:`_im2col.im2col`), then one
  BLAS matrix product through NumPy: forward ``y = w (K, C*KS) @ cols``, backward-weight
  ``gw = gy (K, N*O) @ cols^T``, backward-data ``gcols = w^T @ gy`` added back into gx by
  :func:`_im2col.col2im_add`. The batch is cut into chunks whose column matrix is about a
  megabyte; each thread of :mod:`cnnfast.cpu._parallel` takes whole chunks and runs gather,
  product (single-threaded BLAS) and write-back on them, so a chunk never leaves its core's
  cache.
- pointwise: a 1x1 convolution with stride 1 and no padding over a large enough image is a
  matrix product per sample, ``y[n] = w (K, C) @ x[n] (C, S)``, with no gather at all.
- direct: a Numba loop nest over (n, k) output planes, for filters with few taps
  (C/groups * prod(KS) small: the first layer of a grey-scale network, depthwise convolutions),
  where a matrix product has nothing to chew on.

2D runs as 3D with a depth of 1 (see :mod:`cnnfast.cpu._im2col`). Every output element is
computed by one thread in a fixed order and partial weight gradients are summed in a fixed
order, so results are the same bits on every run.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
from numba import njit

from cnnfast.cpu._im2col import (
    _index_maps,
    _is_same,
    _valid_masks,
    as3d,
    col2im_add,
    geometry3,
    im2col,
    scratch,
    zero_of,
)
from cnnfast.cpu._parallel import (
    num_threads,
    parallel_for,
    run_all,
    single_threaded_blas,
    split,
)

Ints = tuple[int, ...]

# Elements of one chunk's column matrix (4 MiB in float32): wide enough for an efficient
# product (measured best among 1/4 to 8 MiB), small enough to stay in the last-level cache.
COLS_BUDGET = 1 << 20
# Grouped filters with at most this many taps (C/groups * prod(KS)) run the direct kernel.
DIRECT_MAX_TAPS = 16
# A pointwise layer needs this many positions per sample for per-sample products to pay.
POINTWISE_MIN_POSITIONS = 256
# Per-sample column matrices (no transposed write of the product) below this many taps, for
# chunks at least this many output positions wide per sample.
PER_SAMPLE_MAX_TAPS = 256
PER_SAMPLE_MIN_WIDTH = 256


class _Geometry:
    """A convolution's shapes in 3D form (2D has depth 1), worked out in one place."""

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
        self.positions = self.out[0] * self.out[1] * self.out[2]

    def y_shape(self) -> Ints:
        return (self.N, self.K) + self.out[3 - self.nd:]

    def x_shape(self) -> Ints:
        return (self.N, self.C) + self.size[3 - self.nd:]

    def w_shape(self) -> Ints:
        return (self.K, self.Cg) + self.ks[3 - self.nd:]

    def empty(self) -> bool:
        return self.N * self.K * self.C * self.positions == 0

    def pointwise(self) -> bool:
        return (self.groups == 1 and self.ks == (1, 1, 1) and self.st == (1, 1, 1)
                and self.pd == (0, 0, 0) and self.positions >= POINTWISE_MIN_POSITIONS)

    def direct(self) -> bool:
        # Grouped layers with tiny filters (depthwise): per group, a matrix product would be a
        # (K/groups, taps) @ (taps, N*O) sliver. Ungrouped layers, even with one input channel,
        # run faster as one product over all filters.
        return self.groups > 1 and self.taps <= DIRECT_MAX_TAPS

    def gather_args(self):
        return self.ks, self.st, self.pd, self.dl, self.out

    def per_sample(self, chunk) -> bool:
        """Lay the chunk's column matrix out as one matrix per sample, so that the product
        w @ cols[b] lands in y[b] with no transposed copy: worth it when the copy is a large
        share of the work (few taps) and each sample's product is still wide."""
        return self.taps < PER_SAMPLE_MAX_TAPS and chunk[3] * self.out[2] >= PER_SAMPLE_MIN_WIDTH

    def units(self, threads: int) -> list[list[tuple[int, int, int, int]]]:
        """Work units, each a list of chunks (n0, nb, r0, nr) that one thread runs in order.

        A chunk is nb whole samples (nr = OD * OH), or when one sample's column matrix is
        larger than the budget, a band of nr output rows of one sample; the bands of a sample
        form one unit, because neighbouring bands add into the same input rows of gx.
        """
        rows = self.out[0] * self.out[1]
        OW = self.out[2]
        per_sample = self.taps * rows * OW
        if per_sample <= COLS_BUDGET:
            count = -(-self.N * per_sample // COLS_BUDGET)
            count = min(self.N, -(-count // threads) * threads)  # a multiple of the threads
            nb = -(-self.N // count)
            return [[(n0, min(nb, self.N - n0), 0, rows)] for n0 in range(0, self.N, nb)]
        nr = max(1, COLS_BUDGET // (self.taps * OW))
        bands = -(-rows // nr)
        nr = -(-rows // bands)
        return [[(n, 1, r0, min(nr, rows - r0)) for r0 in range(0, rows, nr)]
                for n in range(self.N)]


def _run_units(units: list, work, threads: int) -> None:
    """Run ``work(chunk)`` for every chunk, each unit on one thread, units handed out in turn
    to whichever thread is free (the outputs of different units never overlap)."""
    counter = itertools.count()
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(counter)
            if i >= len(units):
                return
            for chunk in units[i]:
                work(chunk)

    with single_threaded_blas():
        run_all([worker] * max(1, min(threads, len(units))))


# --- forward --------------------------------------------------------------------------------------

def conv_forward(x, w, stride: Ints, padding: Ints, dilation: Ints, groups: int):
    """x (N, C, *S), w (K, C // groups, *KS) -> y (N, K, *O), cross-correlation like PyTorch."""
    geo = _Geometry(x.shape, w.shape, stride, padding, dilation, groups)
    x5 = as3d(x)
    w5 = as3d(np.asarray(w, dtype=x5.dtype))
    if geo.empty():
        return np.zeros(geo.y_shape(), dtype=x5.dtype)
    y5 = np.empty((geo.N, geo.K) + geo.out, dtype=x5.dtype)
    if geo.pointwise():
        w2 = w5.reshape(geo.K, geo.C)
        x3 = x5.reshape(geo.N, geo.C, -1)
        y3 = y5.reshape(geo.N, geo.K, -1)

        def body(a, b):
            np.matmul(w2, x3[a:b], out=y3[a:b])

        with single_threaded_blas():
            parallel_for(body, geo.N)
    elif geo.direct():
        parallel_for(lambda a, b: _direct_forward(x5, w5, geo.st, geo.pd, geo.dl, y5, a, b),
                     geo.N * geo.K, min_per_thread=4)
    else:
        _gemm_forward(x5, w5, geo, y5)
    return y5.reshape(geo.y_shape())


def _gemm_forward(x5, w5, geo: _Geometry, y5) -> None:
    w2 = w5.reshape(geo.K, geo.taps)
    OW = geo.out[2]
    y4 = y5.reshape(geo.N, geo.K, geo.out[0] * geo.out[1], OW)

    def work(chunk):
        n0, nb, r0, nr = chunk
        span = nr * OW
        per_sample = geo.per_sample(chunk)
        cols = scratch("cols", (geo.taps * nb * span,), x5.dtype)
        res = None if per_sample else scratch("gemm", (geo.Kg, nb * span), x5.dtype)
        for g in range(geo.groups):
            im2col(x5, n0, nb, r0, nr, g * geo.Cg, geo.Cg, *geo.gather_args(), cols, per_sample)
            k = slice(g * geo.Kg, (g + 1) * geo.Kg)
            if per_sample:
                for b in range(nb):
                    np.matmul(w2[k], cols[b * geo.taps * span:(b + 1) * geo.taps * span]
                              .reshape(geo.taps, span), out=y4[n0 + b, k, r0:r0 + nr]
                              .reshape(geo.Kg, span))
            else:
                np.matmul(w2[k], cols.reshape(geo.taps, nb * span), out=res)
                y4[n0:n0 + nb, k, r0:r0 + nr] = \
                    res.reshape(geo.Kg, nb, nr, OW).transpose(1, 0, 2, 3)

    threads = num_threads()
    _run_units(geo.units(threads), work, threads)


@njit(nogil=True, cache=True, inline="always")
def _tap_offset(kk, size, ks, pd, dl):
    """In a stride-1 'same' convolution, output position p meets input position p + offset
    under kernel tap kk (flat, within one plane)."""
    D, H, W = size
    KD, KH, KW = ks
    kd = kk // (KH * KW)
    kh = (kk // KW) % KH
    kw = kk % KW
    return ((kd * dl[0] - pd[0]) * H + kh * dl[1] - pd[1]) * W + kw * dl[2] - pd[2]


@njit(nogil=True, cache=True)
def _direct_forward(x, w, st, pd, dl, y, start, stop):
    """Output planes start..stop of y (N, K, OD, OH, OW), plane n * K + k, from x (N, C, D, H, W)
    and w (K, C/groups, KD, KH, KW), adding one kernel tap at a time over the whole plane."""
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = w.shape
    _, _, OD, OH, OW = y.shape
    Kg = K // (C // Cg)
    KK = KD * KH * KW
    xf = x.reshape(-1)
    wf = w.reshape(-1)
    yf = y.reshape(-1)
    plane = D * H * W
    P = OD * OH * OW
    maps = _index_maps((D, H, W), 0, OD * OH, (KD, KH, KW), st, pd, dl, (OD, OH, OW))
    valid = _valid_masks(maps)
    same = _is_same((D, H, W), st, (OD, OH, OW))
    zero = zero_of(xf)
    for task in range(start, stop):
        n = task // K
        k = task - n * K
        g = k // Kg
        yp = yf[task * P:(task + 1) * P]
        yp[:] = 0
        for c in range(Cg):
            xp = xf[(n * C + g * Cg + c) * plane:(n * C + g * Cg + c + 1) * plane]
            for kk in range(KK):
                wv = wf[(k * Cg + c) * KK + kk]
                if same:
                    off = _tap_offset(kk, (D, H, W), (KD, KH, KW), pd, dl)
                    first = min(P, max(0, -off))
                    last = max(first, min(P, plane - off))
                    dst = yp[first:last]
                    src = xp[first + off:last + off]
                    m = valid[kk, first:last]
                    for i in range(last - first):
                        dst[i] += wv * (src[i] if m[i] else zero)
                else:
                    mp = maps[kk]
                    for i in range(P):
                        j = mp[i]
                        v = xp[max(j, 0)]
                        yp[i] += wv * (v if j >= 0 else zero)


# --- backward data --------------------------------------------------------------------------------

def conv_backward_data(gy, w, x_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                       groups: int):
    """gy (N, K, *O), w (K, C // groups, *KS) -> gx (N, C, *S) = x_shape."""
    geo = _Geometry(tuple(x_shape), w.shape, stride, padding, dilation, groups)
    gy5 = as3d(gy)
    w5 = as3d(np.asarray(w, dtype=gy5.dtype))
    if geo.st == (1, 1, 1) and not geo.pointwise() and all(
            p <= d * (k - 1) for p, d, k in zip(geo.pd, geo.dl, geo.ks)):
        # With stride 1 the adjoint is itself a convolution: of gy with the filters flipped in
        # space and transposed (K <-> C within each group), padded by dilation * (KS - 1) - P.
        # The gather it needs is the cheap stride-1 copy, and the product's inner dimension is
        # K * prod(KS) rather than K.
        w_t = w5.reshape((geo.groups, geo.Kg, geo.Cg) + geo.ks)[:, :, :, ::-1, ::-1, ::-1]
        w_t = np.ascontiguousarray(w_t.transpose(0, 2, 1, 3, 4, 5))
        w_t = w_t.reshape((geo.C, geo.Kg) + geo.ks[3 - geo.nd:])
        pad = tuple(d * (k - 1) - p for p, d, k in zip(geo.pd, geo.dl, geo.ks))
        gx = conv_forward(gy, w_t, (1,) * geo.nd, pad[3 - geo.nd:], geo.dl[3 - geo.nd:],
                          geo.groups)
        return gx
    if geo.pointwise():
        gx5 = np.empty((geo.N, geo.C) + geo.size, dtype=gy5.dtype)
        w2t = w5.reshape(geo.K, geo.C).T
        gy3 = gy5.reshape(geo.N, geo.K, -1)
        gx3 = gx5.reshape(geo.N, geo.C, -1)

        def body(a, b):
            np.matmul(w2t, gy3[a:b], out=gx3[a:b])

        with single_threaded_blas():
            parallel_for(body, geo.N)
        return gx5.reshape(geo.x_shape())
    gx5 = np.zeros((geo.N, geo.C) + geo.size, dtype=gy5.dtype)
    if geo.empty():
        return gx5.reshape(geo.x_shape())
    if geo.direct():
        parallel_for(lambda a, b: _direct_backward_data(gy5, w5, geo.st, geo.pd, geo.dl, gx5,
                                                        a, b),
                     geo.N * geo.C, min_per_thread=4)
    else:
        _gemm_backward_data(gy5, w5, geo, gx5)
    return gx5.reshape(geo.x_shape())


def _gy_chunk(gy5, geo: _Geometry, g: int, chunk) -> np.ndarray:
    """gy's chunk for group g as a (K/groups, nb * nr * OW) matrix (a reused buffer)."""
    n0, nb, r0, nr = chunk
    OW = geo.out[2]
    gy4 = gy5.reshape(geo.N, geo.K, geo.out[0] * geo.out[1], OW)
    gyt = scratch("gyt", (geo.Kg, nb, nr, OW), gy5.dtype)
    gyt[...] = gy4[n0:n0 + nb, g * geo.Kg:(g + 1) * geo.Kg, r0:r0 + nr].transpose(1, 0, 2, 3)
    return gyt.reshape(geo.Kg, nb * nr * OW)


def _gemm_backward_data(gy5, w5, geo: _Geometry, gx5) -> None:
    w2 = w5.reshape(geo.K, geo.taps)

    def work(chunk):
        n0, nb, r0, nr = chunk
        gcols = scratch("cols", (geo.taps, nb * nr * geo.out[2]), gy5.dtype)
        for g in range(geo.groups):
            np.matmul(w2[g * geo.Kg:(g + 1) * geo.Kg].T, _gy_chunk(gy5, geo, g, chunk),
                      out=gcols)
            col2im_add(gcols.reshape(-1), n0, nb, r0, nr, g * geo.Cg, geo.Cg,
                       *geo.gather_args(), gx5, False)

    threads = num_threads()
    _run_units(geo.units(threads), work, threads)


@njit(nogil=True, cache=True)
def _direct_backward_data(gy, w, st, pd, dl, gx, start, stop):
    """Input planes start..stop of gx (N, C, D, H, W), plane n * C + c: the adjoint of
    :func:`_direct_forward`, adding one (k, tap) at a time in a fixed order."""
    N, C, D, H, W = gx.shape
    K, Cg, KD, KH, KW = w.shape
    _, _, OD, OH, OW = gy.shape
    Kg = K // (C // Cg)
    KK = KD * KH * KW
    gyf = gy.reshape(-1)
    wf = w.reshape(-1)
    gxf = gx.reshape(-1)
    plane = D * H * W
    P = OD * OH * OW
    maps = _index_maps((D, H, W), 0, OD * OH, (KD, KH, KW), st, pd, dl, (OD, OH, OW))
    for task in range(start, stop):
        n = task // C
        ci = task - n * C
        g = ci // Cg
        c = ci - g * Cg
        xp = gxf[task * plane:(task + 1) * plane]
        for k in range(g * Kg, (g + 1) * Kg):
            yp = gyf[(n * K + k) * P:(n * K + k + 1) * P]
            for kk in range(KK):
                wv = wf[(k * Cg + c) * KK + kk]
                mp = maps[kk]
                for i in range(P):
                    j = mp[i]
                    if j >= 0:
                        xp[j] += wv * yp[i]


# --- backward weight ------------------------------------------------------------------------------

def conv_backward_weight(gy, x, w_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                         groups: int):
    """gy (N, K, *O), x (N, C, *S) -> gw (K, C // groups, *KS) = w_shape."""
    geo = _Geometry(x.shape, tuple(w_shape), stride, padding, dilation, groups)
    gy5 = as3d(gy)
    x5 = as3d(np.asarray(x, dtype=gy5.dtype))
    if geo.empty():
        return np.zeros(geo.w_shape(), dtype=gy5.dtype)
    if geo.direct():
        gw5 = np.empty((geo.K, geo.Cg) + geo.ks, dtype=gy5.dtype)
        parallel_for(lambda a, b: _direct_backward_weight(gy5, x5, geo.st, geo.pd, geo.dl, gw5,
                                                          a, b),
                     geo.K * geo.Cg)
        return gw5.reshape(geo.w_shape())
    return _gemm_backward_weight(gy5, x5, geo).reshape(geo.w_shape())


def _gemm_backward_weight(gy5, x5, geo: _Geometry) -> np.ndarray:
    """Each thread sums gy @ cols^T over a contiguous run of units into its own partial, and
    the partials are added in order, so the result does not depend on timing."""
    threads = num_threads()
    units = geo.units(threads)
    runs = [units[a:b] for a, b in split(len(units), threads)]
    OW = geo.out[2]
    gy4 = gy5.reshape(geo.N, geo.K, geo.out[0] * geo.out[1], OW)

    def job(my_units):
        partial = np.zeros((geo.K, geo.taps), dtype=x5.dtype)
        for chunk in itertools.chain.from_iterable(my_units):
            n0, nb, r0, nr = chunk
            span = nr * OW
            per_sample = geo.per_sample(chunk)
            cols = scratch("cols", (geo.taps * nb * span,), x5.dtype)
            prod = scratch("gemm", (geo.Kg, geo.taps), x5.dtype)
            for g in range(geo.groups):
                k = slice(g * geo.Kg, (g + 1) * geo.Kg)
                im2col(x5, n0, nb, r0, nr, g * geo.Cg, geo.Cg, *geo.gather_args(), cols,
                       per_sample)
                if per_sample:
                    for b in range(nb):
                        c2 = cols[b * geo.taps * span:(b + 1) * geo.taps * span]
                        np.matmul(gy4[n0 + b, k, r0:r0 + nr].reshape(geo.Kg, span),
                                  c2.reshape(geo.taps, span).T, out=prod)
                        partial[k] += prod
                else:
                    np.matmul(_gy_chunk(gy5, geo, g, chunk),
                              cols.reshape(geo.taps, nb * span).T, out=prod)
                    partial[k] += prod
        return partial

    with single_threaded_blas():
        partials = run_all([lambda r=r: job(r) for r in runs])
    total = partials[0]
    for p in partials[1:]:
        total += p
    return total


@njit(nogil=True, cache=True)
def _direct_backward_weight(gy, x, st, pd, dl, gw, start, stop):
    """Filter slices start..stop of gw (K, C/groups, KD, KH, KW), slice k * C/groups + c: each
    tap a dot product of gy's (n, k) planes with the input elements they met, over n in order,
    accumulated in float64."""
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = gw.shape
    _, _, OD, OH, OW = gy.shape
    Kg = K // (C // Cg)
    KK = KD * KH * KW
    gyf = gy.reshape(-1)
    xf = x.reshape(-1)
    gwf = gw.reshape(-1)
    plane = D * H * W
    P = OD * OH * OW
    maps = _index_maps((D, H, W), 0, OD * OH, (KD, KH, KW), st, pd, dl, (OD, OH, OW))
    for task in range(start, stop):
        k = task // Cg
        c = task - k * Cg
        ci = (k // Kg) * Cg + c
        for kk in range(KK):
            mp = maps[kk]
            acc = 0.0
            for n in range(N):
                xp = xf[(n * C + ci) * plane:(n * C + ci + 1) * plane]
                yp = gyf[(n * K + k) * P:(n * K + k + 1) * P]
                acc += _gathered_dot(yp, xp, mp)
            gwf[task * KK + kk] = acc


@njit(nogil=True, cache=True, inline="always")
def _gathered_dot(g, x, where):
    """sum(g[i] * x[where[i]] for where[i] >= 0) in float64, four lanes (a fixed order)."""
    n = g.size
    m = n - n % 4
    s0 = s1 = s2 = s3 = 0.0
    for i in range(0, m, 4):
        j0, j1, j2, j3 = where[i], where[i + 1], where[i + 2], where[i + 3]
        s0 += g[i] * x[max(j0, 0)] if j0 >= 0 else 0.0
        s1 += g[i + 1] * x[max(j1, 0)] if j1 >= 0 else 0.0
        s2 += g[i + 2] * x[max(j2, 0)] if j2 >= 0 else 0.0
        s3 += g[i + 3] * x[max(j3, 0)] if j3 >= 0 else 0.0
    total = (s0 + s1) + (s2 + s3)
    for i in range(m, n):
        j = where[i]
        if j >= 0:
            total += g[i] * x[j]
    return total


# --- bias -----------------------------------------------------------------------------------------

def bias_add(y, b):
    """y (N, K, *O) + b (K,) broadcast over axis 1 -> a new (N, K, *O) array."""
    y3 = np.ascontiguousarray(y).reshape(y.shape[0], y.shape[1], -1)
    b = np.ascontiguousarray(b, dtype=y3.dtype)
    out = np.empty(y3.shape, dtype=y3.dtype)
    parallel_for(lambda a, e: _bias_add(y3, b, out, a, e), y3.shape[0] * y3.shape[1],
                 min_per_thread=max(1, 32768 // max(1, y3.shape[2])))
    return out.reshape(y.shape)


def bias_grad(gy):
    """gy (N, K, *O) -> gb (K,): gy summed over every axis but 1 (float64 accumulators)."""
    g3 = np.ascontiguousarray(gy).reshape(gy.shape[0], gy.shape[1], -1)
    gb = np.empty(gy.shape[1], dtype=g3.dtype)
    parallel_for(lambda a, e: _bias_grad(g3, gb, a, e), g3.shape[1],
                 min_per_thread=max(1, 32768 // max(1, g3.shape[0] * g3.shape[2])))
    return gb


@njit(nogil=True, cache=True)
def _bias_add(y, b, out, start, stop):
    """Planes start..stop (plane n * K + k) of out (N, K, S) = y + b[k]."""
    K = y.shape[1]
    for task in range(start, stop):
        n = task // K
        k = task - n * K
        src = y[n, k]
        dst = out[n, k]
        bk = b[k]
        for s in range(src.size):
            dst[s] = src[s] + bk


@njit(nogil=True, cache=True)
def _bias_grad(gy, gb, start, stop):
    """gb[k] for k in start..stop: gy (N, K, S) summed over n and s, n outermost."""
    N = gy.shape[0]
    for k in range(start, stop):
        total = 0.0
        for n in range(N):
            row = gy[n, k]
            for s in range(row.size):
                total += row[s]
        gb[k] = total
