"""Fast CPU convolution (2D and 3D): forward, backward data, backward weight, bias.

Algorithms, chosen per call from the shapes (and, for float32, ``CNNFAST_CPU_GEMM``, see
:func:`_microkernel.set_gemm`):

- direct (:mod:`._direct`, float32): cnnfast's own microkernel reading the padded input in
  place, no column matrix: the forward (and so backward-data) at stride 1 and backward-weight
  at any stride, wherever at most a quarter of the computed positions are padding columns.
  With AVX-512 BLAS kernels, Winograd goes first on 3x3 layers of at most 32x32 outputs.
- GEMM: gather a chunk of the input into a column matrix (:func:`_im2col.im2col`), multiply
  with BLAS or the microkernel (:func:`_microkernel.use_own`): forward ``y = w (K, C*KS) @ cols``,
  backward-weight ``gw += gy (K, N*O) @ cols^T``, backward-data ``gcols = w^T @ gy`` added back
  into gx by :func:`_im2col.col2im_add`. The batch is cut into chunks whose column matrix is
  about 4 MiB, and one Numba parallel loop runs whole chunks per thread (gather, ``np.dot`` on
  one BLAS thread, write-back), so a chunk never leaves its core. See :mod:`._parallel`.
- backward-data with stride 1 is itself a convolution, of gy with the filters flipped in space
  and transposed, run as a forward GEMM convolution (a cheaper gather than col2im, and a
  product with inner dimension K * prod(KS) instead of K) when C/groups >= K/groups / 2.
- Winograd (:mod:`._winograd`) for 2D 3x3 stride-1 layers with at least 10x10 outputs and 8
  channels: F(2x2, 3x3) forward (and so backward-data), F(3x3, 2x2) backward-weight, 2.25
  times fewer multiplies than the GEMM.
- pointwise: a 1x1 convolution with stride 1 and no padding over a large enough image is
  ``y[n] = w (K, C) @ x[n]`` per sample, with no gather.
- direct: grouped layers with tiny filters (C/groups * prod(KS) <= 16: depthwise), a Numba loop
  over (n, k) output planes that adds one kernel tap at a time over the whole plane. Like the
  bias kernels it runs on one thread: none of the target models has such layers (or biases
  before batch norm), and each parallel build adds seconds to every cold CI run.

2D runs as 3D with a depth of 1. Every output element is computed by one thread in a fixed
order and partial weight gradients are added in a fixed order: the same bits on every run.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from cnnfast.cpu import _direct, _winograd
from cnnfast.cpu._im2col import (
    as3d,
    col2im_add,
    geometry3,
    im2col,
    is_same,
    tap_maps,
    tap_offset,
    zero_of,
)
from cnnfast.cpu._microkernel import MR as TILE_ROWS
from cnnfast.cpu._microkernel import (
    blas_has_avx512,
    enter_flush,
    get_flush_denormals,
    get_gemm,
    leave_flush,
    matmul,
    matmul_packed,
    pack_groups,
    use_direct,
    use_own,
)
from cnnfast.cpu._parallel import (
    num_threads,
    parallel_kernel,
    scratch,
    single_threaded_blas,
)
from cnnfast.cpu._reduce import sum_f64
from cnnfast.shapes import output_size

Ints = tuple[int, ...]

# Elements of one chunk's column matrix (4 MiB in float32): wide enough for an efficient
# product (measured best among 1 to 8 MiB), small enough to stay in the last-level cache.
COLS_BUDGET = 1 << 20
# Grouped filters with at most this many taps (C/groups * prod(KS)) run the direct kernel.
DIRECT_MAX_TAPS = 16
# A pointwise layer needs this many positions per sample for per-sample products to pay.
POINTWISE_MIN_POSITIONS = 256
# Winograd: elements of a chunk's transformed tiles (16 * max(C, K) * tiles: 1 MiB in float32,
# a core's L2), and the smallest layers it pays on (below, the products are too thin and the
# filter transform, memory-bound, costs more than it saves: measured on ResNet-18 shapes).
WINOGRAD_BUDGET = 1 << 18
WINOGRAD_MIN_TILES = 25
WINOGRAD_MIN_CHANNELS = 8
# Backward-weight's Winograd has more transform work per product: it needs wider layers.
WINOGRAD_WEIGHT_MIN_CHANNELS = 32
# Direct (float32, stride 1, own microkernel): the smallest share of the computed output
# positions that is kept (the rest are the padded columns of each row, see _direct).
DIRECT_MIN_EFFICIENCY = 0.75
# With AVX-512 BLAS kernels, Winograd on BLAS beats the direct path on 3x3 layers up to this
# many output positions (28x28, 14x14: 265 vs 190 GFLOP/s equivalent on one Zen 5 thread; at
# 64x64 it fell to 90 vs 200).
WINOGRAD_FIRST_MAX_POSITIONS = 1024


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only: cached arrays are shared by every call with one geometry."""
    a.flags.writeable = False
    return a


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
        self.out = output_size(self.size, self.ks, self.st, self.pd, self.dl)
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
        # Per group a product would be a (K/groups, taps) @ (taps, N*O) sliver. Ungrouped
        # layers, even with one input channel, run faster as one product over all filters.
        return self.groups > 1 and self.taps <= DIRECT_MAX_TAPS

    def direct_gemm(self, dtype, weight: bool = False) -> bool:
        """Groups 1, float32 on the own microkernel, few padded columns wasted:
        :mod:`._direct` (the input read in place, no column matrix). The forward (and so
        backward-data) only at stride 1: at stride 2 the column-matrix product was as fast or
        faster (ResNet-18's downsampling layers, measured); backward-weight at any stride but
        for 1x1 filters with a stride (a quarter of the phases read: the gather is cheaper)."""
        if self.groups != 1 or not use_direct(dtype):
            return False
        if self.st != (1, 1, 1) and (not weight or self.ks == (1, 1, 1)):
            return False
        return _direct.efficiency(self.out, self.size, self.pd, self.st) >= DIRECT_MIN_EFFICIENCY

    def winograd_first(self, dtype) -> bool:
        """Winograd on BLAS ahead of the direct path: ``auto`` with AVX-512 BLAS kernels, a
        Winograd layer of at most WINOGRAD_FIRST_MAX_POSITIONS outputs."""
        return (np.dtype(dtype) == np.float32 and get_gemm() == "auto" and blas_has_avx512()
                and self.winograd() and self.positions <= WINOGRAD_FIRST_MAX_POSITIONS)

    def winograd(self) -> bool:
        """A 2D 3x3 stride-1 undilated ungrouped layer, large enough for Winograd F(2x2, 3x3)."""
        tiles = ((self.out[1] + 1) // 2) * ((self.out[2] + 1) // 2)
        return (self.size[0] == 1 and self.ks == (1, 3, 3) and self.st == (1, 1, 1)
                and self.dl == (1, 1, 1) and self.groups == 1 and self.pd[0] == 0
                and min(self.C, self.K) >= WINOGRAD_MIN_CHANNELS
                and tiles >= WINOGRAD_MIN_TILES)

    @functools.lru_cache(maxsize=8)
    def winograd_units(self, threads: int) -> np.ndarray:
        """Chunks (n0, nb) of whole samples whose transformed tiles fit the budget."""
        tiles = ((self.out[1] + 1) // 2) * ((self.out[2] + 1) // 2)
        per_sample = 16 * max(self.C, self.K) * tiles
        nb = max(1, WINOGRAD_BUDGET // per_sample)
        count = -(-self.N // nb)
        count = min(self.N, -(-count // threads) * threads)
        nb = -(-self.N // count)
        chunks = [(n0, min(nb, self.N - n0)) for n0 in range(0, self.N, nb)]
        return _frozen(np.array(chunks, dtype=np.int64).reshape(-1, 2))

    @functools.cached_property
    def _maps(self):
        maps, valid = tap_maps(self.size, self.ks, self.st, self.pd, self.dl, self.out)
        return _frozen(maps), _frozen(valid)

    def maps(self):
        """(maps, valid) of :func:`_im2col.tap_maps`, worked out once per geometry."""
        return self._maps

    @functools.lru_cache(maxsize=8)
    def units(self, threads: int) -> np.ndarray:
        """Chunks (n0, nb, r0, nr) as an int64 array: nb whole samples (nr = OD * OH), or when
        one sample's column matrix is over the budget, bands of nr output rows of one sample.
        The bands of a sample go to one thread (see :func:`_spread`), as neighbouring bands add
        into the same input rows of gx."""
        rows = self.out[0] * self.out[1]
        OW = self.out[2]
        per_sample = self.taps * rows * OW
        if per_sample <= COLS_BUDGET:
            count = -(-self.N * per_sample // COLS_BUDGET)
            count = min(self.N, -(-count // threads) * threads)  # a multiple of the threads
            nb = -(-self.N // count)
            chunks = [(n0, min(nb, self.N - n0), 0, rows) for n0 in range(0, self.N, nb)]
        else:
            nr = max(1, COLS_BUDGET // (self.taps * OW))
            bands = -(-rows // nr)
            nr = -(-rows // bands)
            chunks = [(n, 1, r0, min(nr, rows - r0)) for n in range(self.N)
                      for r0 in range(0, rows, nr)]
        return _frozen(np.array(chunks, dtype=np.int64).reshape(-1, 4))

    @functools.lru_cache(maxsize=8)
    def chunk_columns(self, threads: int) -> int:
        """The widest chunk's column count."""
        units = self.units(threads)
        return int((units[:, 1] * units[:, 3]).max()) * self.out[2]


@functools.lru_cache(maxsize=64)
def _geometry_cached(x_shape: Ints, w_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                     groups: int) -> _Geometry:
    return _Geometry(x_shape, w_shape, stride, padding, dilation, groups)


def _geometry(x_shape, w_shape, stride, padding, dilation, groups) -> _Geometry:
    """The (cached) geometry of a call: a training loop repeats a few layer shapes, and working
    out shapes, chunks and index maps costs tens of microseconds, more than a small kernel."""
    return _geometry_cached(tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding),
                            tuple(dilation), groups)


def _spread(units: np.ndarray, threads: int) -> np.ndarray:
    """Boundaries of ``threads`` contiguous runs of units, cut only between samples."""
    starts = [0]
    count = len(units)
    for t in range(1, threads):
        i = max(starts[-1], (count * t) // threads)
        while 0 < i < count and units[i, 0] == units[i - 1, 0] and units[i, 1] == 1:
            i += 1  # do not split the bands of one sample
        starts.append(min(i, count))
    starts.append(count)
    return np.array(starts, dtype=np.int64)


# --- forward --------------------------------------------------------------------------------------

def conv_forward(x, w, stride: Ints, padding: Ints, dilation: Ints, groups: int):
    """x (N, C, *S), w (K, C // groups, *KS) -> y (N, K, *O), cross-correlation like PyTorch."""
    geo = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    x5 = as3d(x)
    w5 = as3d(np.asarray(w, dtype=x5.dtype))
    if geo.empty():
        return np.zeros(geo.y_shape(), dtype=x5.dtype)
    y5 = np.empty((geo.N, geo.K) + geo.out, dtype=x5.dtype)
    if geo.pointwise():
        with single_threaded_blas():
            _pointwise(w5.reshape(geo.K, geo.C), x5.reshape(geo.N, geo.C, -1),
                       y5.reshape(geo.N, geo.K, -1), False, *_choices(x5.dtype))
    elif geo.winograd_first(x5.dtype):
        _winograd_forward(x5, w5, geo, y5)
    elif geo.direct_gemm(x5.dtype):
        _direct.forward(x5, w5, geo.st, geo.pd, geo.dl, num_threads(), get_flush_denormals(),
                        y5)
    elif geo.winograd():
        _winograd_forward(x5, w5, geo, y5)
    elif geo.direct():
        maps, valid = geo.maps()
        _direct_forward(x5, w5, geo.ks, geo.pd, geo.dl, maps, valid,
                        is_same(geo.size, geo.st, geo.out), y5)
    else:
        _gemm_forward(x5, w5, geo, y5)
    return y5.reshape(geo.y_shape())


def _gemm_forward(x5, w5, geo: _Geometry, y5) -> None:
    threads = num_threads()
    units = geo.units(threads)
    ncols = geo.chunk_columns(threads)
    cols = scratch("cols", threads, geo.taps * ncols, x5.dtype)
    prod = scratch("prod", threads, geo.Kg * ncols, x5.dtype)
    maps, valid = geo.maps()
    # Fewer chunks than threads (batch 1): each chunk's filters are cut into runs, one task a
    # run (each task gathers its chunk again: cheap beside a product at these sizes).
    # The runs start at multiples of the microkernel's tile rows (panels of the packed filters).
    splits = 1 if len(units) >= threads else min(-(-geo.Kg // TILE_ROWS),
                                                 -(-threads // len(units)))
    own, flush = _choices(x5.dtype)
    w2 = w5.reshape(geo.K, geo.taps)
    with single_threaded_blas():
        _gemm_forward_kernel(x5, w2, pack_groups(w2, geo.groups, own), y5, units, splits,
                             geo.groups, geo.ks, geo.pd, geo.dl, maps, valid,
                             is_same(geo.size, geo.st, geo.out), cols, prod, own, flush)


def _winograd_forward(x5, w5, geo: _Geometry, y5) -> None:
    threads = num_threads()
    units = geo.winograd_units(threads)
    th, tw = (geo.out[1] + 1) // 2, (geo.out[2] + 1) // 2
    tiles = int(units[:, 1].max()) * th * tw
    dtype = x5.dtype
    u = scratch("wino-u", 1, 16 * geo.K * geo.C, dtype).reshape(16, geo.K, geo.C)
    _winograd.transform_filters(w5[:, :, 0], u)
    v = scratch("cols", threads, 16 * geo.C * tiles, dtype)
    m = scratch("prod", threads, 16 * geo.K * tiles, dtype)
    pad = scratch("wino-pad", threads, (2 * th + 2) * (2 * tw + 2), dtype)
    out = scratch("wino-out", threads, 4 * th * tw, dtype)
    with single_threaded_blas():
        _winograd.forward(x5[:, :, 0], u, y5[:, :, 0], units, geo.pd[1], geo.pd[2], v, m, pad,
                          out, *_choices(dtype))


@parallel_kernel
def _gemm_forward_kernel(x, w2, wpack, y, units, splits, groups, ks, pd, dl, maps, valid, same,
                         cols_buf, prod_buf, own, flush):
    """y (N, K, OD, OH, OW) chunk by chunk (one thread per chunk and run of ``splits`` runs of
    each group's filters): gather, one product per group into the thread's buffer, then copy
    each (sample, filter) run into y. ``own`` and ``flush``: see :func:`_choices`; ``wpack``:
    each group's filters packed for the microkernel."""
    N, C = x.shape[0], x.shape[1]
    K, taps = w2.shape
    OD, OH, OW = y.shape[2], y.shape[3], y.shape[4]
    Kg = K // groups
    Cg = C // groups
    y3 = y.reshape(N, K, OD * OH * OW)
    for task in prange(units.shape[0] * splits):
        state = enter_flush(flush)
        t = numba.get_thread_id()
        u = task // splits
        part = task - u * splits
        panels = -(-Kg // TILE_ROWS)
        k0 = min(Kg, panels * part // splits * TILE_ROWS)
        k1 = min(Kg, panels * (part + 1) // splits * TILE_ROWS)
        n0, nb, r0, nr = units[u, 0], units[u, 1], units[u, 2], units[u, 3]
        span = nr * OW
        ncols = nb * span
        cols = cols_buf[t, :taps * ncols]
        prod = prod_buf[t, :(k1 - k0) * ncols].reshape(k1 - k0, ncols)
        for g in range(groups):
            im2col(x, n0, nb, r0, nr, g * Cg, Cg, ks, pd, dl, OW, maps, valid, same, cols)
            matmul_packed(w2[g * Kg + k0:g * Kg + k1], wpack[g, k0 * taps:],
                          cols.reshape(taps, ncols), prod, own)
            for b in range(nb):
                for k in range(k1 - k0):
                    dst = y3[n0 + b, g * Kg + k0 + k, r0 * OW:(r0 + nr) * OW]
                    src = prod[k, b * span:(b + 1) * span]
                    for i in range(span):
                        dst[i] = src[i]
        leave_flush(state)


def _choices(dtype) -> tuple[bool, bool]:
    """(own, flush) for a kernel on arrays of ``dtype``: whether its products run cnnfast's
    microkernel (:func:`_microkernel.use_own`, else BLAS), and whether it runs with
    flush-to-zero / denormals-are-zero (:func:`_microkernel.set_flush_denormals`)."""
    return use_own(dtype), get_flush_denormals()


@parallel_kernel
def _pointwise(w2, x3, y3, transposed, own, flush):
    """y3[n] = w2 @ x3[n] (or w2^T @ x3[n]) for every sample n, one sample per task."""
    for n in prange(x3.shape[0]):
        state = enter_flush(flush)
        if transposed:
            matmul(w2.T, x3[n], y3[n], own)
        else:
            matmul(w2, x3[n], y3[n], own)
        leave_flush(state)


@njit(nogil=True, cache=True)
def _direct_forward(x, w, ks, pd, dl, maps, valid, same, y):
    """y (N, K, OD, OH, OW) from x (N, C, D, H, W) and w (K, C/groups, KD, KH, KW), one task
    per (n, k) output plane, adding one kernel tap at a time over the whole plane."""
    N, C, D, H, W = x.shape
    K, Cg = w.shape[0], w.shape[1]
    KK = ks[0] * ks[1] * ks[2]
    Kg = K // (C // Cg)
    P = y.shape[2] * y.shape[3] * y.shape[4]
    plane = D * H * W
    xf = x.reshape(-1)
    wf = w.reshape(-1)
    yf = y.reshape(-1)
    zero = zero_of(xf)
    for task in range(N * K):
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
                    off = tap_offset(kk, (D, H, W), ks, pd, dl)
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
    geo = _geometry(x_shape, w.shape, stride, padding, dilation, groups)
    gy5 = as3d(gy)
    w5 = as3d(np.asarray(w, dtype=gy5.dtype))
    if geo.empty():
        return np.zeros(geo.x_shape(), dtype=gy5.dtype)
    if geo.pointwise():
        gx5 = np.empty((geo.N, geo.C) + geo.size, dtype=gy5.dtype)
        with single_threaded_blas():
            _pointwise(w5.reshape(geo.K, geo.C), gy5.reshape(geo.N, geo.K, -1),
                       gx5.reshape(geo.N, geo.C, -1), True, *_choices(gy5.dtype))
        return gx5.reshape(geo.x_shape())
    if (geo.st == (1, 1, 1) and not geo.direct() and 2 * geo.Cg >= geo.Kg
            and all(p <= d * (k - 1) for p, d, k in zip(geo.pd, geo.dl, geo.ks))):
        # The adjoint of a stride-1 convolution: gy convolved with the filters flipped in space
        # and transposed (K <-> C within each group), padded by dilation * (KS - 1) - P.
        w_t = w5.reshape((geo.groups, geo.Kg, geo.Cg) + geo.ks)[:, :, :, ::-1, ::-1, ::-1]
        w_t = np.ascontiguousarray(w_t.transpose(0, 2, 1, 3, 4, 5))
        w_t = w_t.reshape((geo.C, geo.Kg) + geo.ks[3 - geo.nd:])
        pad = tuple(d * (k - 1) - p for p, d, k in zip(geo.pd, geo.dl, geo.ks))
        return conv_forward(gy, w_t, (1,) * geo.nd, pad[3 - geo.nd:], geo.dl[3 - geo.nd:],
                            geo.groups)
    gx5 = np.zeros((geo.N, geo.C) + geo.size, dtype=gy5.dtype)
    maps, valid = geo.maps()
    same = is_same(geo.size, geo.st, geo.out)
    if geo.direct():
        _direct_backward_data(gy5, w5, maps, gx5)
        return gx5.reshape(geo.x_shape())
    threads = num_threads()
    units = geo.units(threads)
    ncols = geo.chunk_columns(threads)
    gcols = scratch("cols", threads, geo.taps * ncols, gy5.dtype)
    gyt = scratch("gyt", threads, geo.Kg * ncols, gy5.dtype)
    own, flush = _choices(gy5.dtype)
    w2 = w5.reshape(geo.K, geo.taps)
    with single_threaded_blas():
        _gemm_backward_data_kernel(gy5, w2, pack_groups(w2, geo.groups, own, transposed=True),
                                   gx5, units, _spread(units, threads), geo.groups, geo.ks,
                                   geo.pd, geo.dl, maps, valid, same, gcols, gyt, own, flush)
    return gx5.reshape(geo.x_shape())


@njit(nogil=True, cache=True, inline="always")
def _gather_gy(gy3, n0, nb, r0, nr, OW, k0, Kg, gyt):
    """gy's chunk for filters k0..k0+Kg as a (Kg, nb * nr * OW) matrix in ``gyt``."""
    span = nr * OW
    for k in range(Kg):
        for b in range(nb):
            src = gy3[n0 + b, k0 + k, r0 * OW:(r0 + nr) * OW]
            dst = gyt[k, b * span:(b + 1) * span]
            for i in range(span):
                dst[i] = src[i]


@parallel_kernel
def _gemm_backward_data_kernel(gy, w2, wpack, gx, units, spread, groups, ks, pd, dl, maps,
                               valid, same, gcols_buf, gyt_buf, own, flush):
    """gx (N, C, D, H, W), zeroed, chunk by chunk: gcols = w^T @ gy, added into gx by col2im.
    One thread per run of chunks (``spread``), so the bands of one sample, which add into the
    same rows of gx, stay on one thread, in order."""
    N, K = gy.shape[0], gy.shape[1]
    C = gx.shape[1]
    taps = w2.shape[1]
    OW = gy.shape[4]
    Kg = K // groups
    Cg = C // groups
    gy3 = gy.reshape(N, K, -1)
    for t in prange(spread.size - 1):
        state = enter_flush(flush)
        for u in range(spread[t], spread[t + 1]):
            n0, nb, r0, nr = units[u, 0], units[u, 1], units[u, 2], units[u, 3]
            ncols = nb * nr * OW
            gcols = gcols_buf[t, :taps * ncols]
            gyt = gyt_buf[t, :Kg * ncols].reshape(Kg, ncols)
            for g in range(groups):
                _gather_gy(gy3, n0, nb, r0, nr, OW, g * Kg, Kg, gyt)
                matmul_packed(w2[g * Kg:(g + 1) * Kg].T, wpack[g], gyt,
                              gcols.reshape(taps, ncols), own)
                col2im_add(gcols, n0, nb, r0, nr, g * Cg, Cg, ks, pd, dl, OW, maps, valid,
                           same, gx)
        leave_flush(state)


@njit(nogil=True, cache=True)
def _direct_backward_data(gy, w, maps, gx):
    """gx (N, C, D, H, W), zeroed, one task per (n, c) input plane: the adjoint of
    :func:`_direct_forward`, adding one (k, tap) at a time in a fixed order."""
    N, C = gx.shape[0], gx.shape[1]
    K, Cg = w.shape[0], w.shape[1]
    KK = maps.shape[0]
    Kg = K // (C // Cg)
    P = maps.shape[1]
    plane = gx.shape[2] * gx.shape[3] * gx.shape[4]
    gyf = gy.reshape(-1)
    wf = w.reshape(-1)
    gxf = gx.reshape(-1)
    for task in range(N * C):
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
    geo = _geometry(x.shape, w_shape, stride, padding, dilation, groups)
    gy5 = as3d(gy)
    x5 = as3d(np.asarray(x, dtype=gy5.dtype))
    if geo.empty():
        return np.zeros(geo.w_shape(), dtype=gy5.dtype)
    winograd_weight = geo.winograd() and min(geo.C, geo.K) >= WINOGRAD_WEIGHT_MIN_CHANNELS
    if winograd_weight and geo.winograd_first(gy5.dtype):
        return _winograd_backward_weight(gy5, x5, geo).reshape(geo.w_shape())
    if geo.direct_gemm(gy5.dtype, weight=True):
        return _direct.backward_weight(gy5, x5, geo.ks, geo.st, geo.pd, geo.dl, num_threads(),
                                       get_flush_denormals()).reshape(geo.w_shape())
    if winograd_weight:
        return _winograd_backward_weight(gy5, x5, geo).reshape(geo.w_shape())
    maps, valid = geo.maps()
    if geo.direct():
        gw5 = np.empty((geo.K, geo.Cg) + geo.ks, dtype=gy5.dtype)
        _direct_backward_weight(gy5, x5, maps, gw5)
        return gw5.reshape(geo.w_shape())
    threads = num_threads()
    units = geo.units(threads)
    ncols = geo.chunk_columns(threads)
    spread = _spread(units, threads)
    cols = scratch("cols", threads, geo.taps * ncols, x5.dtype)
    gyt = scratch("gyt", threads, geo.Kg * ncols, x5.dtype)
    prod = scratch("prod", threads, geo.Kg * geo.taps, x5.dtype)
    partials = np.zeros((spread.size - 1, geo.K, geo.taps), dtype=x5.dtype)
    with single_threaded_blas():
        _gemm_backward_weight_kernel(gy5, x5, units, spread, geo.groups, geo.ks, geo.pd, geo.dl,
                                     maps, valid, is_same(geo.size, geo.st, geo.out), cols, gyt,
                                     prod, partials, *_choices(x5.dtype))
    gw = partials[0]
    for p in partials[1:]:
        gw += p  # partial sums added in a fixed order
    return gw.reshape(geo.w_shape())


def _winograd_backward_weight(gy5, x5, geo: _Geometry) -> np.ndarray:
    threads = num_threads()
    units = geo.winograd_units(threads)
    spread = np.array([units.shape[0] * t // threads for t in range(threads + 1)],
                      dtype=np.int64)
    th, tw = (geo.out[1] + 1) // 2, (geo.out[2] + 1) // 2
    tiles = int(units[:, 1].max()) * th * tw
    dtype = x5.dtype
    runs = spread.size - 1
    v = scratch("cols", runs, 16 * geo.C * tiles, dtype)
    q = scratch("gyt", runs, 16 * geo.K * tiles, dtype)
    pad = scratch("wino-pad", runs, (2 * th + 2) * (2 * tw + 2), dtype)
    gpad = scratch("wino-out", runs, 4 * th * tw, dtype)
    prod = scratch("prod", runs, geo.K * geo.C, dtype)
    partials = np.zeros((runs, 16, geo.K, geo.C), dtype=dtype)
    with single_threaded_blas():
        _winograd.backward_weight(x5[:, :, 0], gy5[:, :, 0], units, spread, geo.pd[1],
                                  geo.pd[2], v, q, pad, gpad, prod, partials, *_choices(dtype))
    total = partials[0]
    for p in partials[1:]:
        total += p  # partial sums added in a fixed order
    gw = np.empty((geo.K, geo.C, 3, 3), dtype=dtype)
    _winograd.filters_from(total, gw)
    return gw


@parallel_kernel
def _gemm_backward_weight_kernel(gy, x, units, spread, groups, ks, pd, dl, maps, valid, same,
                                 cols_buf, gyt_buf, prod_buf, partials, own, flush):
    """partials[t] (K, C/groups * prod(KS)) = sum over thread t's run of chunks of
    gy (K, cols) @ cols^T, group by group."""
    N, C = x.shape[0], x.shape[1]
    K = gy.shape[1]
    OW = gy.shape[4]
    taps = partials.shape[2]
    Kg = K // groups
    Cg = C // groups
    gy3 = gy.reshape(N, K, -1)
    for t in prange(spread.size - 1):
        state = enter_flush(flush)
        prod = prod_buf[t, :Kg * taps].reshape(Kg, taps)
        for u in range(spread[t], spread[t + 1]):
            n0, nb, r0, nr = units[u, 0], units[u, 1], units[u, 2], units[u, 3]
            ncols = nb * nr * OW
            cols = cols_buf[t, :taps * ncols]
            gyt = gyt_buf[t, :Kg * ncols].reshape(Kg, ncols)
            for g in range(groups):
                im2col(x, n0, nb, r0, nr, g * Cg, Cg, ks, pd, dl, OW, maps, valid, same, cols)
                _gather_gy(gy3, n0, nb, r0, nr, OW, g * Kg, Kg, gyt)
                matmul(gyt, cols.reshape(taps, ncols).T, prod, own)
                part = partials[t, g * Kg:(g + 1) * Kg]
                for k in range(Kg):
                    dst = part[k]
                    src = prod[k]
                    for i in range(taps):
                        dst[i] += src[i]
        leave_flush(state)


@njit(nogil=True, cache=True)
def _direct_backward_weight(gy, x, maps, gw):
    """gw (K, C/groups, KD, KH, KW), one task per (k, c) filter slice: each tap a dot product
    of gy's (n, k) planes with the input elements they met, over n in order, in float64."""
    N, C = x.shape[0], x.shape[1]
    K, Cg = gw.shape[0], gw.shape[1]
    KK = maps.shape[0]
    Kg = K // (C // Cg)
    P = maps.shape[1]
    plane = x.shape[2] * x.shape[3] * x.shape[4]
    gyf = gy.reshape(-1)
    xf = x.reshape(-1)
    gwf = gw.reshape(-1)
    for task in range(K * Cg):
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
    out = np.empty(y3.shape, dtype=y3.dtype)
    _bias_add(y3, np.ascontiguousarray(b, dtype=y3.dtype), out)
    return out.reshape(y.shape)


def bias_grad(gy):
    """gy (N, K, *O) -> gb (K,): gy summed over every axis but 1, in float64."""
    g3 = np.ascontiguousarray(gy).reshape(gy.shape[0], gy.shape[1], -1)
    gb = np.empty(gy.shape[1], dtype=g3.dtype)
    _bias_grad(g3, gb)
    return gb


@njit(nogil=True, cache=True)
def _bias_add(y, b, out):
    """out (N, K, S) = y + b[k], one task per (n, k) plane."""
    K = y.shape[1]
    for task in range(y.shape[0] * K):
        n = task // K
        k = task - n * K
        src = y[n, k]
        dst = out[n, k]
        bk = b[k]
        for s in range(src.size):
            dst[s] = src[s] + bk


@njit(nogil=True, cache=True)
def _bias_grad(gy, gb):
    """gb[k] = gy (N, K, S) summed over n and s, n outermost, one task per k."""
    for k in range(gy.shape[1]):
        total = 0.0
        for n in range(gy.shape[0]):
            total += sum_f64(gy[n, k])
        gb[k] = total
