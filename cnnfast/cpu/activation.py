"""Fast CPU ReLU: elementwise Numba loops over contiguous ranges, one range per thread."""

from __future__ import annotations

import numpy as np
from numba import njit

from cnnfast.cpu._im2col import zero_of
from cnnfast.cpu._parallel import parallel_for

# Elements per thread below which splitting the work costs more than it saves.
MIN_PER_THREAD = 1 << 16


def relu_forward(x):
    """y = max(x, 0) elementwise (NaN stays NaN); any shape, x's dtype, a new array."""
    xc = np.ascontiguousarray(x)
    y = np.empty_like(xc)
    xf = xc.reshape(-1)
    yf = y.reshape(-1)
    parallel_for(lambda a, b: _relu(xf, yf, a, b), xf.size, min_per_thread=MIN_PER_THREAD)
    return y


def relu_backward(gy, y):
    """gx = gy where y > 0 else 0; gy and y share one shape; gy's dtype, a new array."""
    gyc = np.ascontiguousarray(gy)
    yc = np.ascontiguousarray(y)
    gx = np.empty_like(gyc)
    gf = gyc.reshape(-1)
    yf = yc.reshape(-1)
    gxf = gx.reshape(-1)
    parallel_for(lambda a, b: _relu_grad(gf, yf, gxf, a, b), gf.size,
                 min_per_thread=MIN_PER_THREAD)
    return gx


@njit(nogil=True, cache=True)
def _relu(x, y, start, stop):
    src = x[start:stop]
    dst = y[start:stop]
    zero = zero_of(x)
    for i in range(stop - start):
        v = src[i]
        dst[i] = zero if v < zero else v  # a NaN compares false and passes through


@njit(nogil=True, cache=True)
def _relu_grad(gy, y, gx, start, stop):
    g = gy[start:stop]
    out = y[start:stop]
    dst = gx[start:stop]
    zero = zero_of(gy)
    for i in range(stop - start):
        dst[i] = g[i] if out[i] > 0 else zero
