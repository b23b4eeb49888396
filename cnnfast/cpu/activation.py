"""Fast CPU ReLU: elementwise Numba parallel loops over blocks of the flattened array."""

from __future__ import annotations

import numpy as np
from numba import prange

from cnnfast.cpu._im2col import zero_of
from cnnfast.cpu._parallel import parallel_kernel

# Elements per parallel task: large enough to amortise a task, small enough to balance.
BLOCK = 1 << 14


def relu_forward(x):
    """y = max(x, 0) elementwise (NaN stays NaN); any shape, x's dtype, a new array."""
    xc = np.asarray(x, order="C")  # not ascontiguousarray: it turns a 0-d array into (1,)
    y = np.empty_like(xc)
    _relu(xc.reshape(-1), y.reshape(-1))
    return y


def relu_backward(gy, y):
    """gx = gy where y > 0 else 0; gy and y share one shape; gy's dtype, a new array."""
    gyc = np.asarray(gy, order="C")
    gx = np.empty_like(gyc)
    _relu_grad(gyc.reshape(-1), np.asarray(y, order="C").reshape(-1), gx.reshape(-1))
    return gx


@parallel_kernel
def _relu(x, y):
    zero = zero_of(x)
    for block in prange((x.size + BLOCK - 1) // BLOCK):
        src = x[block * BLOCK:(block + 1) * BLOCK]
        dst = y[block * BLOCK:(block + 1) * BLOCK]
        for i in range(src.size):
            v = src[i]
            dst[i] = zero if v < zero else v  # a NaN compares false and passes through


@parallel_kernel
def _relu_grad(gy, y, gx):
    zero = zero_of(gy)
    for block in prange((gy.size + BLOCK - 1) // BLOCK):
        g = gy[block * BLOCK:(block + 1) * BLOCK]
        out = y[block * BLOCK:(block + 1) * BLOCK]
        dst = gx[block * BLOCK:(block + 1) * BLOCK]
        for i in range(g.size):
            dst[i] = g[i] if out[i] > 0 else zero
