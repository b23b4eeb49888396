"""Activations and dropout: ``relu``, ``sigmoid``, ``softmax``, ``log_softmax``, ``dropout``."""

from __future__ import annotations

import numpy as np

from cnnfast import dispatch, rng
from cnnfast.functional.checks import float_tensor
from cnnfast.tensor import FLOAT_DTYPES, Function, Tensor


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


def _softmax_input(x, dim, dtype, op: str) -> tuple[Tensor, int]:
    """The checked input (converted to ``dtype`` when given) and ``dim`` as an axis >= 0."""
    x = float_tensor(x, op, "input")
    if dtype is not None:
        if np.dtype(dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype!r}")
        x = x.to(dtype=dtype)
    rank = max(x.ndim, 1)
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or not -rank <= dim < rank:
        raise ValueError(f"{op}: dim must be an int in [{-rank}, {rank - 1}] for input of shape "
                         f"{x.shape}, got {dim!r}")
    return x, int(dim) % rank


def log_softmax(x, dim: int = -1, dtype=None) -> Tensor:
    """Numerically stable log-softmax along ``dim``; ``dtype`` (float32/float64) converts the
    input first, as PyTorch's argument does."""
    x, axis = _softmax_input(x, dim, dtype, "log_softmax")
    if x.ndim == 0:  # a scalar is a softmax over one value
        return log_softmax(x.reshape(1)).reshape(())
    if x.size == 0:  # nothing to normalise (and no max of an empty axis)
        return x * 0.0
    shift = x.xp.max(x.data, axis=axis, keepdims=True)  # a constant: the result is independent
    z = x - Tensor(shift, device=x.device)
    return z - z.exp().sum(axis=axis, keepdims=True).log()


def softmax(x, dim: int = -1, dtype=None) -> Tensor:
    """exp(log_softmax(x, dim, dtype))."""
    return log_softmax(x, dim, dtype).exp()


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
