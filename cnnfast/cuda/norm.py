"""CUDA batch normalisation (2D and 3D), alone or fused with the ReLU that follows it.

Training forward is three launches: two per-channel reduction passes (the sum, then the squared
deviations from the mean it gives; two-pass stays accurate when |mean| >> std) and one map that
works out mean, invstd and gamma * invstd per channel from the partials, normalises, and
optionally clamps at 0. Backward is two: one reduction of gy * (x - mean) and gy (gy masked by
the fused ReLU's output), and one map. The kernels are in :mod:`cnnfast.cuda._channel`;
reductions are fixed-order, so every result repeats bit for bit. The fused ops give the same
bits as batch norm followed by ``relu_forward`` / preceded by ``relu_backward``.
"""

from __future__ import annotations

import numpy as np

from cnnfast.cuda import _runtime as rt
from cnnfast.cuda._channel import channel_map, channel_partials, channel_plan


def _forward_train(x, gamma, beta, eps: float, relu: bool):
    plan = channel_plan(x)
    c = plan.C
    stats = rt.empty(2 * c, x.dtype, like=x)  # mean, then invstd
    if plan.count == 0:
        stats[...] = np.nan  # the mean of no values, as NumPy gives it
        return rt.empty(x.shape, x.dtype, like=x), stats[:c], stats[c:]
    part = channel_partials("sum", x, plan)
    channel_partials("centered_squares", x, plan, part=part)
    y = channel_map("bn_train", x, part=part, p=gamma, q=beta, stats=stats, eps=eps, relu=relu,
                    plan=plan)
    return y, stats[:c], stats[c:]


def batch_norm_forward_train(x, gamma, beta, eps: float):
    """x (N, C, *S), gamma, beta (C,) -> (y (N, C, *S), mean (C,), invstd (C,)), x's dtype.

    Biased batch variance, two-pass; invstd = 1 / sqrt(var + eps).
    """
    return _forward_train(x, gamma, beta, eps, relu=False)


def batch_norm_relu_forward_train(x, gamma, beta, eps: float):
    """As :func:`batch_norm_forward_train`, with y = max(batch_norm(x), 0), in one pass less."""
    return _forward_train(x, gamma, beta, eps, relu=True)


def batch_norm_forward_eval(x, gamma, beta, running_mean, running_var, eps: float):
    """x (N, C, *S); gamma, beta, running_mean, running_var (C,) -> y (N, C, *S), x's dtype."""
    return channel_map("eval", x, p=running_mean, q=running_var, r=gamma, s=beta, eps=eps)


def batch_norm_relu_forward_eval(x, gamma, beta, running_mean, running_var, eps: float):
    """max(batch_norm_forward_eval(...), 0) in one launch."""
    return channel_map("eval", x, p=running_mean, q=running_var, r=gamma, s=beta, eps=eps,
                       relu=True)


def _backward(gy, x, y, gamma, mean, invstd):
    plan = channel_plan(x)
    c = plan.C
    grads = rt.empty(2 * c, x.dtype, like=x)  # ggamma, then gbeta
    if plan.count == 0:
        grads[...] = 0
        return rt.empty(x.shape, x.dtype, like=x), grads[:c], grads[c:]
    part = channel_partials("centered_products", x, plan, b=gy, y=y, center=mean)
    gx = channel_map("bn_grad", x, b=gy, y=y, part=part, p=gamma, q=mean, r=invstd,
                     stats=grads, relu=y is not None, plan=plan)
    return gx, grads[:c], grads[c:]


def batch_norm_backward(gy, x, gamma, mean, invstd):
    """Training-mode gradients: gy, x (N, C, *S); gamma, mean, invstd (C,) -> (gx, ggamma, gbeta).

    gx = gamma * invstd * (gy - gbeta / count - (x - mean) * invstd * ggamma / count) with
    gbeta = sum gy, ggamma = sum gy * (x - mean) * invstd per channel, count = N * prod(S).
    """
    return _backward(gy, x, None, gamma, mean, invstd)


def batch_norm_relu_backward(gy, x, y, gamma, mean, invstd):
    """Gradients of y = max(batch_norm(x), 0) given that y: gy masked where y <= 0, then
    :func:`batch_norm_backward`, in two launches."""
    return _backward(gy, x, y, gamma, mean, invstd)
