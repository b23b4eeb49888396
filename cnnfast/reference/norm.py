"""Reference batch normalisation (2D and 3D): statistics per channel over N and the spatial axes.

x has shape (N, C, *S); mean, invstd, gamma, beta, running_mean, running_var have shape (C,).
Runs on NumPy and CuPy arrays alike.
"""

from __future__ import annotations

from cnnfast.backend import array_xp


def _reduce_axes(x) -> tuple[int, ...]:
    """Every axis but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, ndim: int):
    """(C,) -> (1, C, 1, ...) to broadcast against an (N, C, *S) array."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_forward_train(x, gamma, beta, eps: float):
    """Training-mode batch norm with the biased batch variance.

    x (N, C, *S), gamma (C,), beta (C,) -> (y (N, C, *S), mean (C,), invstd (C,)),
    invstd = 1 / sqrt(var + eps); all in x's dtype.
    """
    xp = array_xp(x)
    axes = _reduce_axes(x)
    mean = x.mean(axis=axes)
    centered = x - _per_channel(mean, x.ndim)
    var = (centered * centered).mean(axis=axes)
    invstd = (1 / xp.sqrt(var + x.dtype.type(eps))).astype(x.dtype, copy=False)
    scale = _per_channel(gamma * invstd, x.ndim)
    y = centered * scale + _per_channel(beta, x.ndim)
    return y.astype(x.dtype, copy=False), mean.astype(x.dtype, copy=False), invstd


def batch_norm_forward_eval(x, gamma, beta, running_mean, running_var, eps: float):
    """Eval-mode batch norm with running statistics.

    x (N, C, *S); gamma, beta, running_mean, running_var (C,) -> y (N, C, *S) in x's dtype.
    """
    xp = array_xp(x)
    invstd = 1 / xp.sqrt(running_var + eps)
    scale = _per_channel(gamma * invstd, x.ndim)
    y = (x - _per_channel(running_mean, x.ndim)) * scale + _per_channel(beta, x.ndim)
    return y.astype(x.dtype, copy=False)


def batch_norm_backward(gy, x, gamma, mean, invstd):
    """Gradients of training-mode batch norm (the batch statistics depend on x).

    gy, x (N, C, *S); gamma, mean, invstd (C,) -> (gx (N, C, *S), ggamma (C,), gbeta (C,)).
    With xhat = (x - mean) * invstd and M = N * prod(S) elements per channel:
    gx = gamma * invstd / M * (M * gy - gbeta - xhat * ggamma).
    """
    axes = _reduce_axes(x)
    count = x.size // x.shape[1]
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    gbeta = gy.sum(axis=axes)
    ggamma = (gy * xhat).sum(axis=axes)
    scale = _per_channel(gamma * invstd / x.dtype.type(count), x.ndim)
    gx = scale * (count * gy - _per_channel(gbeta, x.ndim) - xhat * _per_channel(ggamma, x.ndim))
    return gx.astype(x.dtype, copy=False), ggamma.astype(x.dtype, copy=False), gbeta
