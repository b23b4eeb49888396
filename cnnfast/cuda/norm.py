"""CUDA batch normalisation (2D and 3D), and the per-channel kernels it shares with conv's bias.

Two kernel shapes cover every per-channel op on an (N, C, *S) array (OSP = prod(S) elements per
(n, c) plane, count = N * OSP per channel):

- :func:`channel_sums` reduces each channel: a grid (C, splits) of blocks, each summing one
  channel over a contiguous chunk of its count elements into float64 registers, then a
  fixed-order shared-memory tree; one thread per channel adds the splits' partials in split
  order. No atomics, so the bits repeat run to run. Batch-norm statistics are two-pass (mean,
  then the mean of squared deviations), which stays accurate when |mean| >> std.
- :func:`channel_map` applies a per-channel affine map elementwise: one block row per (n, c)
  plane, so the channel's coefficients are read once per thread, not decoded per element.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float64

from cnnfast.cuda import _runtime as rt

_SUM, _CENTERED_SQUARES, _CENTERED_PRODUCTS = 0, 1, 2
_SUM_MODES = {"sum": _SUM, "centered_squares": _CENTERED_SQUARES,
              "centered_products": _CENTERED_PRODUCTS}
_BIAS, _AFFINE, _EVAL, _BN_GRAD = 0, 1, 2, 3
_MAP_MODES = {"bias": _BIAS, "affine": _AFFINE, "eval": _EVAL, "bn_grad": _BN_GRAD}

_TARGET_BLOCKS = 512  # channel-sum blocks to aim for: a large GPU's SMs, a few blocks each
_MIN_PER_THREAD = 4  # elements each thread sums at least before a channel is split further


@functools.lru_cache(maxsize=None)
def _channel_sums_kernel(threads: int, mode: int):
    NT = threads
    MODE = mode

    @cuda.jit
    def channel_sums_kernel(a, b, center, part1, part2, C, osp, count, chunk):
        # Each block sums channel c = blockIdx.x over elements [z * chunk, (z + 1) * chunk) of
        # its count = N * OSP (z = blockIdx.y), each thread every NT-th one, then a fixed-order
        # tree. Sums: a (SUM); (a - center)^2 (CENTERED_SQUARES); b * (a - center) and b.
        c = cuda.blockIdx.x
        z = cuda.blockIdx.y
        t = cuda.threadIdx.x
        tree1 = cuda.shared.array(NT, float64)
        tree2 = cuda.shared.array(NT, float64)
        mu = 0.0
        if MODE != _SUM:
            mu = float64(center[c])
        s1 = 0.0
        s2 = 0.0
        j = z * chunk + t
        end = min(count, z * chunk + chunk)
        n = j // osp
        o = j - n * osp
        while j < end:
            i = (n * C + c) * osp + o
            if MODE == _SUM:
                s1 += a[i]
            elif MODE == _CENTERED_SQUARES:
                v = a[i] - mu
                s1 += v * v
            else:
                g = float64(b[i])
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
            part1[z * C + c] = tree1[0]
            part2[z * C + c] = tree2[0]

    return channel_sums_kernel


@functools.lru_cache(maxsize=None)
def _finish_sums_kernel():
    @cuda.jit
    def finish_sums_kernel(part1, part2, splits, C, scale, out1, out2):
        # Each thread finishes channel c: its splits' partials added in split order, times scale.
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            s1 = 0.0
            s2 = 0.0
            for z in range(splits):
                s1 += part1[z * C + c]
                s2 += part2[z * C + c]
            out1[c] = s1 * scale
            out2[c] = s2 * scale

    return finish_sums_kernel


def channel_sums(mode: str, a, b=None, center=None, scale: float = 1.0, dtype=None):
    """Per-channel sums over N and the spatial axes of (N, C, *S) arrays, times ``scale``.

    mode ``"sum"``: (sum a, 0); ``"centered_squares"``: (sum (a - center)^2, 0);
    ``"centered_products"``: (sum b * (a - center), sum b). ``center`` is (C,). Returns two (C,)
    arrays of ``dtype`` (float64 unless given); accumulation is float64 throughout.
    """
    cfg = rt.current_config()
    threads = cfg.threads
    n, c = int(a.shape[0]), int(a.shape[1])
    osp = a.size // max(n * c, 1)
    count = n * osp
    dtype = np.dtype(np.float64 if dtype is None else dtype)
    out1 = rt.empty(c, dtype, like=a)
    out2 = rt.empty(c, dtype, like=a)
    if c == 0:
        return out1, out2
    if count == 0:
        out1[...] = 0
        out2[...] = 0
        return out1, out2
    splits = max(1, min(rt.cdiv(_TARGET_BLOCKS, c), rt.cdiv(count, threads * _MIN_PER_THREAD)))
    chunk = rt.cdiv(rt.cdiv(count, splits), threads) * threads
    splits = rt.cdiv(count, chunk)
    part1 = rt.empty(splits * c, np.float64, like=a)
    part2 = rt.empty(splits * c, np.float64, like=a)
    a_flat = rt.flat(a)
    b_flat = a_flat if b is None else rt.flat(b)
    center = part1 if center is None else rt.flat(center)  # unread in "sum" mode
    rt.launch(_channel_sums_kernel(threads, _SUM_MODES[mode]), (c, splits), threads,
              a_flat, b_flat, center, part1, part2, c, osp, count, chunk)
    rt.launch(_finish_sums_kernel(), rt.cdiv(c, threads), threads,
              part1, part2, splits, c, float(scale), out1, out2)
    return out1, out2


@functools.lru_cache(maxsize=None)
def _channel_map_kernel(mode: int, dtype: np.dtype):
    MODE = mode
    nbt = rt.nb_type(dtype)
    zero = dtype.type(0)

    @cuda.jit
    def channel_map_kernel(a, b, p, q, r, s, out, C, osp, eps):
        # Each block row covers the (n, c) plane blockIdx.x; each thread its elements
        # blockIdx.y * blockDim.x + threadIdx.x + multiples of gridDim.y * blockDim.x.
        # BIAS: a + p; AFFINE: (a - p) * q + r; EVAL: (a - p) * r / sqrt(q + eps) + s;
        # BN_GRAD (a = x, b = gy): p * (b - q - (a - r) * s); p, q, r, s are per channel.
        plane = cuda.blockIdx.x
        c = plane % C
        base = plane * osp
        k1 = zero
        k2 = zero
        k3 = zero
        k4 = zero
        if MODE == _BIAS:
            k1 = p[c]
        elif MODE == _AFFINE:
            k1 = p[c]
            k2 = q[c]
            k3 = r[c]
        elif MODE == _EVAL:
            k1 = p[c]
            k2 = r[c] * nbt(1.0 / math.sqrt(q[c] + eps))
            k3 = s[c]
        else:
            k1 = p[c]
            k2 = q[c]
            k3 = r[c]
            k4 = s[c]
        i = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        while i < osp:
            v = a[base + i]
            if MODE == _BIAS:
                out[base + i] = v + k1
            elif MODE == _BN_GRAD:
                out[base + i] = k1 * (b[base + i] - k2 - (v - k3) * k4)
            else:
                out[base + i] = (v - k1) * k2 + k3
            i += cuda.gridDim.y * cuda.blockDim.x

    return channel_map_kernel


def channel_map(mode: str, a, b=None, p=None, q=None, r=None, s=None, eps: float = 0.0):
    """Elementwise per-channel map of (N, C, *S) arrays (formulas in the kernel) -> a new array.

    ``p`` (BIAS) or ``p``, ``q``, ``r`` (AFFINE) or ``p``, ``q``, ``r``, ``s`` (EVAL, BN_GRAD)
    are (C,) arrays of a's dtype.
    """
    out = rt.empty(a.shape, a.dtype, like=a)
    n, c = int(a.shape[0]), int(a.shape[1])
    osp = a.size // max(n * c, 1)
    if out.size == 0:
        return out
    threads = rt.current_config().threads
    threads = min(threads, max(32, 1 << (osp - 1).bit_length()))
    chunks = max(1, min(rt.cdiv(osp, threads * 4), 65535))
    a_flat = rt.flat(a)
    coefficients = [p if v is None else v for v in (p, q, r, s)]
    rt.launch(_channel_map_kernel(_MAP_MODES[mode], np.dtype(a.dtype)), (n * c, chunks), threads,
              a_flat, a_flat if b is None else rt.flat(b), *[rt.flat(v) for v in coefficients],
              out.reshape(-1), c, osp, float(eps))
    return out


@functools.lru_cache(maxsize=None)
def _bn_stats_kernel():
    @cuda.jit
    def bn_stats_kernel(mean64, var64, gamma, eps, C, mean, invstd, scale):
        # Each thread finishes channel c: mean, invstd = 1 / sqrt(var + eps) and
        # scale = gamma * invstd.
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            mean[c] = mean64[c]
            invstd[c] = 1.0 / math.sqrt(var64[c] + eps)
            scale[c] = gamma[c] * invstd[c]

    return bn_stats_kernel


@functools.lru_cache(maxsize=None)
def _bn_grad_coefficients_kernel():
    @cuda.jit
    def bn_grad_coefficients_kernel(sum_gxc, sum_g, gamma, invstd, C, count,
                                    ggamma, gbeta, coef_a, coef_b, coef_c):
        # Each thread finishes channel c: ggamma, gbeta, and the coefficients of
        # gx = coef_a * (gy - coef_b - (x - mean) * coef_c).
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            inv = float64(invstd[c])
            gg = sum_gxc[c] * inv
            gb = sum_g[c]
            ggamma[c] = gg
            gbeta[c] = gb
            coef_a[c] = gamma[c] * inv
            coef_b[c] = gb / count
            coef_c[c] = gg * inv / count

    return bn_grad_coefficients_kernel


def _vectors(c: int, dtype, like, how_many: int):
    return [rt.empty(c, dtype, like=like) for _ in range(how_many)]


def batch_norm_forward_train(x, gamma, beta, eps: float):
    """x (N, C, *S), gamma, beta (C,) -> (y (N, C, *S), mean (C,), invstd (C,)), x's dtype.

    Biased batch variance, two-pass; invstd = 1 / sqrt(var + eps).
    """
    c = int(x.shape[1])
    count = x.size // max(c, 1)
    mean64, _ = channel_sums("sum", x, scale=1.0 / max(count, 1))
    var64, _ = channel_sums("centered_squares", x, center=mean64, scale=1.0 / max(count, 1))
    mean, invstd, scale = _vectors(c, x.dtype, x, 3)
    if c:
        threads = rt.current_config().threads
        rt.launch(_bn_stats_kernel(), rt.cdiv(c, threads), threads,
                  mean64, var64, rt.flat(gamma), float(eps), c, mean, invstd, scale)
    y = channel_map("affine", x, p=mean, q=scale, r=beta)
    return y, mean, invstd


def batch_norm_forward_eval(x, gamma, beta, running_mean, running_var, eps: float):
    """x (N, C, *S); gamma, beta, running_mean, running_var (C,) -> y (N, C, *S), x's dtype."""
    return channel_map("eval", x, p=running_mean, q=running_var, r=gamma, s=beta, eps=eps)


def batch_norm_backward(gy, x, gamma, mean, invstd):
    """Training-mode gradients: gy, x (N, C, *S); gamma, mean, invstd (C,) -> (gx, ggamma, gbeta).

    gx = gamma * invstd * (gy - gbeta / count - (x - mean) * invstd * ggamma / count) with
    gbeta = sum gy, ggamma = sum gy * (x - mean) * invstd per channel, count = N * prod(S).
    """
    c = int(x.shape[1])
    count = x.size // max(c, 1)
    sum_gxc, sum_g = channel_sums("centered_products", x, gy, center=mean)
    ggamma, gbeta, coef_a, coef_b, coef_c = _vectors(c, x.dtype, x, 5)
    if c:
        threads = rt.current_config().threads
        rt.launch(_bn_grad_coefficients_kernel(), rt.cdiv(c, threads), threads,
                  sum_gxc, sum_g, rt.flat(gamma), rt.flat(invstd), c, max(count, 1),
                  ggamma, gbeta, coef_a, coef_b, coef_c)
    gx = channel_map("bn_grad", x, gy, p=coef_a, q=coef_b, r=mean, s=coef_c)
    return gx, ggamma, gbeta
