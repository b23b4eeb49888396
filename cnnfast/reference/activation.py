"""Reference activations: ReLU forward and backward, and the dropout mask every path shares.

All functions run on NumPy and CuPy arrays alike.
"""

from __future__ import annotations

import numpy as np

from cnnfast.backend import array_xp


def relu_forward(x):
    """y = max(x, 0) elementwise (NaN stays NaN, like PyTorch); any shape, x's dtype."""
    return array_xp(x).maximum(x, x.dtype.type(0))


def relu_backward(gy, y):
    """gx = gy where y > 0 else 0; gy and y share one shape."""
    xp = array_xp(gy)
    return xp.where(y > 0, gy, gy.dtype.type(0))


def dropout_mask(xp, shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype):
    """A dropout mask of ``shape``: 1 / (1 - p) with probability 1 - p, else 0.

    Drawn on the host from ``rng`` (so a seeded generator gives the same mask on every path),
    then moved to ``xp``. ``p == 1`` gives all zeros; ``p == 0`` all ones.
    """
    dtype = np.dtype(dtype)
    if p >= 1:
        return xp.zeros(shape, dtype=dtype)
    keep = rng.random(shape) >= p
    mask = np.where(keep, dtype.type(1.0 / (1.0 - p)), dtype.type(0)).astype(dtype, copy=False)
    return xp.asarray(mask)
