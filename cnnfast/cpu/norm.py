"""Fast CPU batch normalisation (2D and 3D), statistics per channel over N and the spatial axes.

Training mode runs one parallel task per channel: a channel's statistics (one pass of
shifted sums in float64) and its normalisation are done together while the channel's N planes
are still in cache. Eval mode is one task per (n, c) plane.
All sums use :mod:`cnnfast.cpu._reduce` (fixed order), so results are the same bits every run.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from cnnfast.cpu._parallel import parallel_kernel
from cnnfast.cpu._reduce import centered_sums_f64, dot_centered_f64


def _as3(x) -> np.ndarray:
    """A C-contiguous (N, C, S) view (or copy) of an (N, C, *S) array."""
    x = np.ascontiguousarray(x)
    return x.reshape(x.shape[0], x.shape[1], -1)


def batch_norm_forward_train(x, gamma, beta, eps: float):
    """x (N, C, *S), gamma, beta (C,) -> (y (N, C, *S), mean (C,), invstd (C,)).

    Biased batch variance; invstd = 1 / sqrt(var + eps); everything in x's dtype.
    """
    x3 = _as3(x)
    dtype = x3.dtype
    gamma = np.ascontiguousarray(gamma, dtype=dtype)
    beta = np.ascontiguousarray(beta, dtype=dtype)
    y = np.empty_like(x3)
    mean = np.empty(x3.shape[1], dtype=dtype)
    invstd = np.empty(x3.shape[1], dtype=dtype)
    _bn_train(x3, gamma, beta, float(eps), y, mean, invstd)
    return y.reshape(x.shape), mean, invstd


def batch_norm_forward_eval(x, gamma, beta, running_mean, running_var, eps: float):
    """x (N, C, *S) normalised with running statistics -> y (N, C, *S) in x's dtype."""
    x3 = _as3(x)
    dtype = x3.dtype
    running_var = np.asarray(running_var)
    invstd = 1 / np.sqrt(running_var + eps)
    scale = np.ascontiguousarray(np.asarray(gamma) * invstd, dtype=dtype)
    shift = np.ascontiguousarray(running_mean, dtype=dtype)
    beta = np.ascontiguousarray(beta, dtype=dtype)
    y = np.empty_like(x3)
    _bn_eval(x3, shift, scale, beta, y)
    return y.reshape(x.shape)


def batch_norm_backward(gy, x, gamma, mean, invstd):
    """Training-mode gradients: gy, x (N, C, *S); gamma, mean, invstd (C,) ->
    (gx (N, C, *S), ggamma (C,), gbeta (C,)), with M = N * prod(S) and xhat = (x - mean) * invstd:
    gx = gamma * invstd / M * (M * gy - gbeta - xhat * ggamma)."""
    x3 = _as3(x)
    dtype = x3.dtype
    gy3 = _as3(np.asarray(gy, dtype=dtype))
    gamma = np.ascontiguousarray(gamma, dtype=dtype)
    mean = np.ascontiguousarray(mean, dtype=dtype)
    invstd = np.ascontiguousarray(invstd, dtype=dtype)
    gx = np.empty_like(x3)
    ggamma = np.empty(x3.shape[1], dtype=dtype)
    gbeta = np.empty(x3.shape[1], dtype=dtype)
    _bn_backward(gy3, x3, gamma, mean, invstd, gx, ggamma, gbeta)
    return gx.reshape(x.shape), ggamma, gbeta


@parallel_kernel
def _bn_train(x, gamma, beta, eps, y, mean, invstd):
    """One task per channel of x (N, C, S): statistics, then y = (x - mean) * gamma * invstd
    + beta, computed in x's dtype like the reference."""
    N, C, S = x.shape
    count = N * S
    for c in prange(C):
        coef = np.empty(2, dtype=x.dtype)  # the channel's (gamma * invstd, mean) in x's dtype
        # One pass of sums shifted by the channel's first element (the shifted-data variance:
        # as exact as two passes in float64 unless that element lies thousands of standard
        # deviations from the mean).
        shift0 = float(x[0, c, 0]) if count else 0.0
        deviation = 0.0
        squares = 0.0
        for n in range(N):
            d, q = centered_sums_f64(x[n, c], shift0)
            deviation += d
            squares += q
        m = shift0 + deviation / count if count else math.nan
        var = squares / count - (deviation / count) ** 2 if count else math.nan
        var = max(var, 0.0)
        mean[c] = m
        invstd[c] = 1.0 / math.sqrt(var + eps)
        coef[0] = gamma[c] * invstd[c]
        coef[1] = mean[c]
        scale = coef[0]
        shift = coef[1]
        b = beta[c]
        for n in range(N):
            src = x[n, c]
            dst = y[n, c]
            for s in range(S):
                dst[s] = (src[s] - shift) * scale + b


@parallel_kernel
def _bn_eval(x, shift, scale, beta, y):
    """y = (x - running_mean) * scale + beta, one task per (n, c) plane."""
    C = x.shape[1]
    for p in prange(x.shape[0] * C):
        n = p // C
        c = p - n * C
        src = x[n, c]
        dst = y[n, c]
        m = shift[c]
        k = scale[c]
        b = beta[c]
        for s in range(src.size):
            dst[s] = (src[s] - m) * k + b


@parallel_kernel
def _bn_backward(gy, x, gamma, mean, invstd, gx, ggamma, gbeta):
    """One task per channel: sums of gy and gy * (x - mean) in float64, then
    gx = k1 * gy - k2 - k3 * (x - mean) with the channel's coefficients in x's dtype."""
    N, C, S = x.shape
    count = N * S
    for c in prange(C):
        coef = np.empty(4, dtype=x.dtype)
        m = mean[c]
        g_sum = 0.0
        g_dot = 0.0
        for n in range(N):
            s1, s2 = dot_centered_f64(gy[n, c], x[n, c], m)
            g_sum += s1
            g_dot += s2
        istd = float(invstd[c])
        gbeta[c] = g_sum
        ggamma[c] = g_dot * istd
        k1 = float(gamma[c]) * istd
        coef[0] = k1
        coef[1] = k1 * g_sum / max(count, 1)
        coef[2] = k1 * istd * g_dot * istd / max(count, 1)
        coef[3] = m
        a1 = coef[0]
        a2 = coef[1]
        a3 = coef[2]
        shift = coef[3]
        for n in range(N):
            g = gy[n, c]
            src = x[n, c]
            dst = gx[n, c]
            for s in range(S):
                dst[s] = a1 * g[s] - a2 - a3 * (src[s] - shift)
