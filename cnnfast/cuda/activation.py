"""CUDA ReLU forward and backward: grid-stride elementwise kernels over the flat array."""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from cnnfast.cuda import _runtime as rt

_MAX_BLOCKS = 4096  # grid-stride kernels: enough blocks to fill a large GPU a few times over


@functools.lru_cache(maxsize=None)
def _relu_forward_kernel(dtype: np.dtype):
    zero = dtype.type(0)

    @cuda.jit
    def relu_forward_kernel(x, y, size):
        # Each thread computes y[i] = max(x[i], 0) for i = its global id + multiples of the grid
        # size (a NaN stays NaN, like PyTorch).
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < size:
            v = x[i]
            y[i] = zero if v < zero else v
            i += cuda.gridDim.x * cuda.blockDim.x

    return relu_forward_kernel


@functools.lru_cache(maxsize=None)
def _relu_backward_kernel(dtype: np.dtype):
    zero = dtype.type(0)

    @cuda.jit
    def relu_backward_kernel(gy, y, gx, size):
        # Each thread computes gx[i] = gy[i] if y[i] > 0 else 0 for i = its global id + multiples
        # of the grid size.
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < size:
            gx[i] = gy[i] if y[i] > zero else zero
            i += cuda.gridDim.x * cuda.blockDim.x

    return relu_backward_kernel


def _grid(size: int) -> tuple[int, int]:
    threads = rt.current_config().threads
    return max(1, min(rt.cdiv(size, threads), _MAX_BLOCKS)), threads


def relu_forward(x):
    """y = max(x, 0) elementwise; any shape, x's dtype."""
    y = rt.empty(x.shape, x.dtype, like=x)
    if y.size:
        rt.launch(_relu_forward_kernel(np.dtype(x.dtype)), *_grid(y.size),
                  rt.flat(x), y.reshape(-1), y.size)
    return y


def relu_backward(gy, y):
    """gx = gy where y > 0 else 0; gy and y share one shape."""
    gx = rt.empty(gy.shape, gy.dtype, like=gy)
    if gx.size:
        rt.launch(_relu_backward_kernel(np.dtype(gy.dtype)), *_grid(gx.size),
                  rt.flat(gy), rt.flat(y), gx.reshape(-1), gx.size)
    return gx
