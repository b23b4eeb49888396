"""Per-channel CUDA kernels on (N, C, *S) arrays: batch norm's and the convolution bias's.

Two kernel shapes cover every per-channel op (OSP = prod(S) elements per (n, c) plane,
count = N * OSP per channel):

- :func:`channel_partials` reduces each channel: a grid (C, splits) of blocks, each summing one
  channel over a contiguous chunk of its count elements into float64 registers, then a
  fixed-order shared-memory tree, writing its partial to ``part[slot, split, c]``. Nothing adds
  the splits' partials in a launch of its own: whichever kernel reads them next (the second
  batch-norm pass, the map below, :func:`channel_sum`'s finish) adds them in split order. No
  atomics, so the bits repeat run to run. Batch-norm statistics are two-pass (the mean, then
  the mean of squared deviations from it), which stays accurate when |mean| >> std.
- :func:`channel_map` applies a per-channel affine map elementwise, one block row per (n, c)
  plane: thread 0 of each block works out the channel's coefficients (from the partials, for
  batch norm) into shared memory once, so no element decodes its channel. ReLU fuses into it:
  the output clamped at 0 in forward; in backward the incoming gradient masked where the fused
  output was 0, exactly as ``relu_backward`` would have masked it.

The per-array sizes (C, OSP, count, chunk, splits) travel as one :class:`ChannelPlan` tuple,
which a launch passes as one small device array.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import cuda, float64

from cnnfast.cuda import _runtime as rt

SUM, CENTERED_SQUARES, CENTERED_PRODUCTS = 0, 1, 2
_SUM_MODES = {"sum": SUM, "centered_squares": CENTERED_SQUARES,
              "centered_products": CENTERED_PRODUCTS}
BIAS, EVAL, BN_TRAIN, BN_GRAD = 0, 1, 2, 3
_MAP_MODES = {"bias": BIAS, "eval": EVAL, "bn_train": BN_TRAIN, "bn_grad": BN_GRAD}

_TARGET_BLOCKS = 512  # channel-sum blocks to aim for: a large GPU's SMs, a few blocks each
_MIN_PER_THREAD = 4  # elements each thread sums at least before a channel is split further


class ChannelPlan(NamedTuple):
    """How an (N, C, *S) array is reduced per channel: ``splits`` blocks per channel, each
    summing ``chunk`` of the channel's ``count`` = N * ``osp`` elements."""

    C: int
    osp: int
    count: int
    chunk: int
    splits: int


def channel_plan(a) -> ChannelPlan:
    """The reduction plan of ``a`` (N, C, *S) under the current block size."""
    threads = rt.current_config().threads
    n, c = int(a.shape[0]), int(a.shape[1])
    osp = a.size // max(n * c, 1)
    count = n * osp
    if count == 0:
        return ChannelPlan(c, osp, 0, threads, 1)
    splits = max(1, min(rt.cdiv(_TARGET_BLOCKS, max(c, 1)),
                        rt.cdiv(count, threads * _MIN_PER_THREAD)))
    chunk = rt.cdiv(rt.cdiv(count, splits), threads) * threads
    return ChannelPlan(c, osp, count, chunk, rt.cdiv(count, chunk))


def _placeholder(like):
    """A float64 array standing in for an argument a kernel mode does not read. Never an alias
    of an output: the simulator copies every array argument back after a launch."""
    return rt.cached_table(("float64 placeholder",), lambda: np.zeros(1), like=like)


@functools.lru_cache(maxsize=None)
def _partials_kernel(threads: int, mode: int, relu: bool):
    NT = threads
    MODE, RELU = mode, relu

    @cuda.jit
    def channel_partials_kernel(a, b, y, center, part, plan):
        # Each block sums channel c = blockIdx.x over elements [z * chunk, (z + 1) * chunk) of
        # its count = N * OSP (z = blockIdx.y), each thread every NT-th one, then a fixed-order
        # tree; thread 0 writes part[0, z, c] (and part[1, z, c]). Sums: a (SUM);
        # (a - mean)^2 with the mean from part[0]'s splits (CENTERED_SQUARES, into part[1]);
        # g * (a - center) and g, g = b masked where y <= 0 when RELU (CENTERED_PRODUCTS).
        C, osp, count, chunk, splits = plan
        c = cuda.blockIdx.x
        z = cuda.blockIdx.y
        t = cuda.threadIdx.x
        tree1 = cuda.shared.array(NT, float64)
        tree2 = cuda.shared.array(NT, float64)
        mu = 0.0
        if MODE == CENTERED_SQUARES:
            if t == 0:
                total = 0.0
                for zz in range(splits):
                    total += part[zz * C + c]
                tree1[0] = total * (1.0 / count)
            cuda.syncthreads()
            mu = tree1[0]
            cuda.syncthreads()
        elif MODE == CENTERED_PRODUCTS:
            mu = float64(center[c])
        s1 = 0.0
        s2 = 0.0
        j = z * chunk + t
        end = min(count, z * chunk + chunk)
        n = j // osp
        o = j - n * osp
        while j < end:
            i = (n * C + c) * osp + o
            if MODE == SUM:
                s1 += a[i]
            elif MODE == CENTERED_SQUARES:
                v = a[i] - mu
                s1 += v * v
            else:
                g = float64(b[i])
                if RELU and not y[i] > 0:
                    g = 0.0
                s1 += g * (a[i] - mu)
                s2 += g
            j += NT
            o += NT
            if o >= osp:
                q = o // osp
                n += q
                o -= q * osp
        tree1[t] = s1
        tree2[t] = s2
        cuda.syncthreads()
        half = NT // 2
        while half > 0:
            if t < half:
                tree1[t] += tree1[t + half]
                tree2[t] += tree2[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            if MODE == CENTERED_SQUARES:
                part[(splits + z) * C + c] = tree1[0]
            else:
                part[z * C + c] = tree1[0]
            if MODE == CENTERED_PRODUCTS:
                part[(splits + z) * C + c] = tree2[0]

    return channel_partials_kernel


def channel_partials(mode: str, a, plan: ChannelPlan, part=None, b=None, y=None, center=None):
    """Launch one per-channel partial-sum pass over ``a`` (N, C, *S) -> ``part`` (float64,
    (2, splits, C) flat), allocated when not given. Modes: ``"sum"`` (into slot 0),
    ``"centered_squares"`` (around the mean of slot 0, into slot 1), ``"centered_products"``
    (b * (a - center) into slot 0 and b into slot 1, b masked where y <= 0 when ``y`` is
    given). ``center`` is (C,)."""
    if part is None:
        part = rt.empty(2 * plan.splits * plan.C, np.float64, like=a)
    if plan.count == 0 or plan.C == 0:
        part[...] = 0
        return part
    threads = rt.current_config().threads
    a_flat = rt.flat(a)
    b_flat = a_flat if b is None else rt.flat(b)
    y_flat = a_flat if y is None else rt.flat(y)
    center = _placeholder(a) if center is None else rt.flat(center)  # read by products only
    rt.launch(_partials_kernel(threads, _SUM_MODES[mode], y is not None), (plan.C, plan.splits),
              threads, a_flat, b_flat, y_flat, center, part, plan)
    return part


@functools.lru_cache(maxsize=None)
def _finish_kernel(dtype: np.dtype):
    nbt = rt.nb_type(dtype)

    @cuda.jit
    def finish_sum_kernel(part, out, plan):
        # Each thread finishes channel c: its splits' partials (slot 0) added in split order.
        C, osp, count, chunk, splits = plan
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            total = 0.0
            for z in range(splits):
                total += part[z * C + c]
            out[c] = nbt(total)

    return finish_sum_kernel


def channel_sum(a):
    """(N, C, *S) -> (C,) in a's dtype: a summed over every axis but 1, in float64, in a fixed
    order (two launches)."""
    plan = channel_plan(a)
    out = rt.empty(plan.C, a.dtype, like=a)
    if plan.C == 0:
        return out
    part = channel_partials("sum", a, plan)
    threads = rt.current_config().threads
    rt.launch(_finish_kernel(np.dtype(a.dtype)), rt.cdiv(plan.C, threads), threads,
              part, out, plan)
    return out


@functools.lru_cache(maxsize=None)
def _map_kernel(mode: int, relu: bool, dtype: np.dtype):
    MODE, RELU = mode, relu
    nbt = rt.nb_type(dtype)
    zero = dtype.type(0)

    @cuda.jit
    def channel_map_kernel(a, b, y, part, p, q, r, s, out, stats, plan, eps):
        # Each block row covers the (n, c) plane blockIdx.x; each thread its elements
        # blockIdx.y * blockDim.x + threadIdx.x + multiples of gridDim.y * blockDim.x.
        # BIAS: a + p; EVAL: (a - p) * r / sqrt(q + eps) + s; BN_TRAIN: (a - mean) * p * invstd
        # + q with mean, invstd from part and written to stats by the plane-0 block;
        # BN_GRAD (a = x, b = gy, p = gamma, q = mean, r = invstd):
        # k1 * (g - k2 - (a - q) * k4) with ggamma, gbeta from part, written to stats.
        # RELU: outputs clamped at 0; in BN_GRAD, g = b where y > 0 else 0.
        C, osp, count, chunk, splits = plan
        plane = cuda.blockIdx.x
        c = plane % C
        base = plane * osp
        t = cuda.threadIdx.x
        k = cuda.shared.array(4, nbt)
        if t == 0:
            if MODE == BIAS:
                k[0] = p[c]
            elif MODE == EVAL:
                k[0] = p[c]
                k[1] = r[c] * nbt(1.0 / math.sqrt(q[c] + eps))
                k[2] = s[c]
            else:
                s1 = 0.0
                s2 = 0.0
                for z in range(splits):
                    s1 += part[z * C + c]
                    s2 += part[(splits + z) * C + c]
                first = plane < C and cuda.blockIdx.y == 0
                if MODE == BN_TRAIN:
                    mean = nbt(s1 * (1.0 / count))
                    invstd = nbt(1.0 / math.sqrt(s2 * (1.0 / count) + eps))
                    k[0] = mean
                    k[1] = p[c] * invstd
                    k[2] = q[c]
                    if first:
                        stats[c] = mean
                        stats[C + c] = invstd
                else:
                    inv = float64(r[c])
                    gg = s1 * inv
                    k[0] = p[c] * inv
                    k[1] = s2 / count
                    k[2] = q[c]
                    k[3] = gg * inv / count
                    if first:
                        stats[c] = gg
                        stats[C + c] = s2
        cuda.syncthreads()
        k1 = k[0]
        k2 = k[1]
        k3 = k[2]
        k4 = k[3]
        i = cuda.blockIdx.y * cuda.blockDim.x + t
        while i < osp:
            v = a[base + i]
            if MODE == BIAS:
                v = v + k1
            elif MODE == BN_GRAD:
                g = b[base + i]
                if RELU and not y[base + i] > zero:
                    g = zero
                v = k1 * (g - k2 - (v - k3) * k4)
            else:
                v = (v - k1) * k2 + k3
            if RELU and MODE != BN_GRAD:
                v = zero if v < zero else v
            out[base + i] = v
            i += cuda.gridDim.y * cuda.blockDim.x

    return channel_map_kernel


def channel_map(mode: str, a, b=None, y=None, part=None, p=None, q=None, r=None, s=None,
                stats=None, eps: float = 0.0, relu: bool = False, plan: ChannelPlan | None = None):
    """Elementwise per-channel map of (N, C, *S) arrays (formulas in the kernel) -> a new array.

    ``p`` (BIAS); ``p``, ``q``, ``r``, ``s`` (EVAL); ``p``, ``q`` and ``part`` (BN_TRAIN);
    ``b``, ``p``, ``q``, ``r`` and ``part`` (BN_GRAD) are (C,) arrays of a's dtype (``part``:
    :func:`channel_partials`' float64 partials). BN_TRAIN and BN_GRAD write two (C,) rows of
    per-channel results into ``stats`` (2 * C, a's dtype). ``relu`` fuses a ReLU (see above).
    """
    out = rt.empty(a.shape, a.dtype, like=a)
    plan = channel_plan(a) if plan is None else plan
    n = int(a.shape[0])
    if out.size == 0:
        return out
    threads = rt.current_config().threads
    threads = min(threads, max(32, 1 << (plan.osp - 1).bit_length()))
    chunks = max(1, min(rt.cdiv(plan.osp, threads * 4), 65535))
    a_flat = rt.flat(a)
    coefficients = [rt.flat(p if v is None else v) for v in (p, q, r, s)]
    if part is None:  # unread; one float64 placeholder keeps one kernel signature per mode
        part = _placeholder(a)
    rt.launch(_map_kernel(_MAP_MODES[mode], bool(relu), np.dtype(a.dtype)),
              (n * plan.C, chunks), threads,
              a_flat, a_flat if b is None else rt.flat(b), a_flat if y is None else rt.flat(y),
              part, *coefficients, out.reshape(-1),
              coefficients[0] if stats is None else stats, plan, float(eps))
    return out
