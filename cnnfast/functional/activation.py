"""Activations and dropout: ``relu``, ``sigmoid``, ``softmax``, ``log_softmax``, ``dropout``."""

from __future__ import annotations

import numpy as np

from cnnfast import dispatch, rng
from cnnfast.functional.checks import float_tensor
from cnnfast.tensor import Function, Tensor


class ReLU(Function):
    def forward(self, x):
        self.kernels = dispatch.kernels(self.device)
        self.y = self.kernels.relu_forward(x)
        return self.y

    def backward(self, gy):
        return self.kernels.relu_backward(gy, self.y)


def relu(x) -> Tensor:
    """max(x, 0) elementwise; the gradient at 0 is 0 (like PyTorch)."""
    return ReLU().apply(float_tensor(x, "relu", "input"))


def sigmoid(x) -> Tensor:
    return float_tensor(x, "sigmoid", "input").sigmoid()


def log_softmax(x, dim: int = -1) -> Tensor:
    """Numerically stable log-softmax along ``dim``."""
    x = float_tensor(x, "log_softmax", "input")
    shift = x.xp.max(x.data, axis=dim, keepdims=True)  # a constant: the result is independent
    z = x - Tensor(shift, device=x.device)
    return z - z.exp().sum(axis=dim, keepdims=True).log()


def softmax(x, dim: int = -1) -> Tensor:
    return log_softmax(x, dim).exp()


class Dropout(Function):
    def __init__(self, mask):
        self.mask = mask  # 0 or 1/(1-p), the input's shape and dtype

    def forward(self, x):
        return x * self.mask

    def backward(self, gy):
        return gy * self.mask


def dropout(x, p: float = 0.5, training: bool = True,
            rng_: np.random.Generator | int | None = None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) (training only).

    The mask comes from ``rng_`` (a Generator or seed) or the global generator of
    :func:`cnnfast.manual_seed`, so a seed fixes it.
    """
    x = float_tensor(x, "dropout", "input")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p!r}")
    if not training or p == 0.0:
        return x
    kernels = dispatch.kernels(x.device)
    mask = kernels.dropout_mask(x.xp, x.shape, float(p), rng.resolve(rng_), x.dtype)
    return Dropout(mask).apply(x)
