"""Batch norm: training (batch statistics) and evaluation (running statistics)."""

from __future__ import annotations

import numpy as np

from cnnfast import dispatch
from cnnfast.functional.checks import check_same, float_tensor
from cnnfast.tensor import Function, Tensor


class BatchNormTrain(Function):
    """Batch statistics; updates the running buffers (arrays, or None) in place when they are
    given; ``relu`` applies a ReLU to the output in the same op."""

    def __init__(self, running_mean, running_var, momentum: float, eps: float,
                 relu: bool = False):
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.relu = momentum, eps, relu

    def forward(self, x, gamma, beta):
        k = self.kernels = dispatch.kernels(self.device)
        forward = k.batch_norm_relu_forward_train if self.relu else k.batch_norm_forward_train
        y, mean, invstd = forward(x, gamma, beta, self.eps)
        if self.running_mean is not None:
            n = x.size // x.shape[1]
            var = 1.0 / (invstd * invstd) - self.eps
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * var * (n / max(n - 1, 1))
        if any(self.needs_input_grad):
            self.x, self.gamma, self.mean, self.invstd = x, gamma, mean, invstd
            self.y = y if self.relu else None
        return y

    def backward(self, gy):
        k = self.kernels
        if self.relu:
            gx, ggamma, gbeta = k.batch_norm_relu_backward(gy, self.x, self.y, self.gamma,
                                                           self.mean, self.invstd)
        else:
            gx, ggamma, gbeta = k.batch_norm_backward(gy, self.x, self.gamma, self.mean,
                                                      self.invstd)
        need = self.needs_input_grad
        return (gx if need[0] else None, ggamma if need[1] else None, gbeta if need[2] else None)


class BatchNormEval(Function):
    """Running statistics: an affine map per channel; ``relu`` as in :class:`BatchNormTrain`."""

    def __init__(self, running_mean, running_var, eps: float, relu: bool = False):
        self.running_mean, self.running_var, self.eps, self.relu = (running_mean, running_var,
                                                                    eps, relu)

    def forward(self, x, gamma, beta):
        k = self.kernels = dispatch.kernels(self.device)
        self.nd = x.ndim - 2
        if self.needs_input_grad[1]:
            self.x = x
        self.gamma = gamma
        forward = k.batch_norm_relu_forward_eval if self.relu else k.batch_norm_forward_eval
        y = forward(x, gamma, beta, self.running_mean, self.running_var, self.eps)
        self.y = y if self.relu and any(self.needs_input_grad) else None
        return y

    def backward(self, gy):
        if self.relu:
            gy = self.kernels.relu_backward(gy, self.y)
        xp = dispatch.array_xp(gy)
        shape = (1, -1) + (1,) * self.nd
        axes = (0,) + tuple(range(2, gy.ndim))
        invstd = 1.0 / xp.sqrt(self.running_var + self.eps)
        need = self.needs_input_grad
        gx = gy * (self.gamma * invstd).reshape(shape) if need[0] else None
        ggamma = None
        if need[1]:
            xhat = (self.x - self.running_mean.reshape(shape)) * invstd.reshape(shape)
            ggamma = (gy * xhat).sum(axis=axes)
        gbeta = gy.sum(axis=axes) if need[2] else None
        return gx, ggamma, gbeta


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch norm over (N, *spatial) per channel, x (N, C, H, W) or (N, C, D, H, W).

    Training uses the batch's statistics (biased variance) and, when the running buffers are
    given, updates them in place: ``r = (1 - momentum) * r + momentum * batch`` with the
    unbiased variance. Evaluation uses the running statistics.
    """
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_relu(x, running_mean, running_var, weight=None, bias=None,
                    training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``relu(batch_norm(...))`` as one op (one fused kernel on ``cuda``; the same values)."""
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       relu=True)


def _batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5, relu: bool = False) -> Tensor:
    """:func:`batch_norm`; ``relu=True`` applies a ReLU to the output in the same op."""
    op = "batch_norm"
    x = float_tensor(x, op, "input")
    if x.ndim not in (2, 3, 4, 5):
        raise ValueError(f"{op}: input must be 2-D (N, C), 3-D (N, C, L), 4-D (N, C, H, W) or "
                         f"5-D (N, C, D, H, W), got shape {x.shape}")
    shape = x.shape
    if x.ndim < 4:  # (N, C) and (N, C, L) run as (N, C, L, 1)
        x = x.reshape(shape[:2] + (int(np.prod(shape[2:])), 1))
    C = x.shape[1]
    xp = x.xp
    gamma = (float_tensor(weight, op, "weight", device=x.device) if weight is not None
             else Tensor(xp.ones(C, dtype=x.dtype), device=x.device))
    beta = (float_tensor(bias, op, "bias", device=x.device) if bias is not None
            else Tensor(xp.zeros(C, dtype=x.dtype), device=x.device))
    stats = {}
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        stats[name] = None if buf is None else float_tensor(buf, op, name, device=x.device)
    check_same(op, x, "input", weight=gamma, bias=beta, **stats)
    for name, t in (("weight", gamma), ("bias", beta), *stats.items()):
        if t is not None and t.shape != (C,):
            raise ValueError(f"{op}: {name} must have shape ({C},) for {C} channels, got {t.shape}")
    rm = None if stats["running_mean"] is None else stats["running_mean"].data
    rv = None if stats["running_var"] is None else stats["running_var"].data
    if (rm is None) != (rv is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if x.size == 0:  # nothing to normalise; the running statistics stay (PyTorch)
        return x.reshape(shape) * 1.0
    if training:
        if x.size // C <= 1:
            raise ValueError(f"{op}: training needs more than one value per channel, got input "
                             f"shape {x.shape}")
        fn = BatchNormTrain(rm, rv, float(momentum), float(eps), bool(relu))
        return fn.apply(x, gamma, beta).reshape(shape)
    if rm is None:
        raise ValueError(f"{op}: evaluation mode (training=False) needs running_mean and "
                         f"running_var")
    return BatchNormEval(rm, rv, float(eps), bool(relu)).apply(x, gamma, beta).reshape(shape)
