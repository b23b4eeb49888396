"""Pooling: max, average and adaptive average, 2D and 3D."""

from __future__ import annotations

import numpy as np

from cnnfast import dispatch
from cnnfast.functional.checks import IntOrTuple, batched, float_tensor, int_arg, unbatched
from cnnfast.functional.pad import on_empty_batch
from cnnfast.shapes import ntuple, output_size
from cnnfast.tensor import Function, Tensor


class MaxPool(Function):
    """Outputs ``(y, indices)``: indices (int64, flat within each spatial plane) carry no
    gradient."""

    def __init__(self, kernel: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool):
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def forward(self, x):
        k = self.kernels = dispatch.kernels(self.device)
        self.x_shape = x.shape
        y, self.idx = k.max_pool_forward(x, self.kernel, self.stride, self.padding, self.dilation,
                                         self.ceil_mode)
        return y, self.idx

    def backward(self, gy):
        return self.kernels.max_pool_backward(gy, self.idx, self.x_shape)


class AvgPool(Function):
    def __init__(self, kernel: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], ceil_mode: bool, count_include_pad: bool,
                 divisor_override: int | None):
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.options = (ceil_mode, count_include_pad, divisor_override)

    def forward(self, x):
        k = self.kernels = dispatch.kernels(self.device)
        self.x_shape = x.shape
        return k.avg_pool_forward(x, self.kernel, self.stride, self.padding, *self.options)

    def backward(self, gy):
        return self.kernels.avg_pool_backward(gy, self.x_shape, self.kernel, self.stride,
                                              self.padding, *self.options)


def _pool_geometry(nd: int, op: str, x, kernel_size, stride, padding, dilation, ceil_mode):
    """Checked (x, kernel, stride, padding, dilation, ceil_mode) of a pooling call, with
    PyTorch's rules: positive kernel, stride and dilation, padding at most half the kernel, and
    at least one output along every axis. ``x`` comes back batched, with whether it was not
    (:func:`~cnnfast.functional.checks.batched`); ``stride`` None or ``()`` is the kernel."""
    x, was_unbatched = batched(float_tensor(x, op, "input"), nd, op)
    kernel = ntuple(kernel_size, nd, op, "kernel_size", 1)
    empty = stride is None or (isinstance(stride, (tuple, list)) and not stride)
    stride = kernel if empty else ntuple(stride, nd, op, "stride", 1)
    padding = ntuple(padding, nd, op, "padding", 0)
    dilation = ntuple(dilation, nd, op, "dilation", 1)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"{op}: ceil_mode must be a bool, got {ceil_mode!r}")
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{op}: padding {padding} must be at most half of kernel_size {kernel}")
    out = output_size(x.shape[2:], kernel, stride, padding, dilation, bool(ceil_mode))
    if min(out) < 1:
        raise ValueError(f"{op}: kernel_size {kernel} (dilation {dilation}) is larger than the "
                         f"padded input {tuple(s + 2 * p for s, p in zip(x.shape[2:], padding))}"
                         f": output size {out} is too small")
    return x, was_unbatched, kernel, stride, padding, dilation, bool(ceil_mode)


def _run(fn, x: Tensor, was_unbatched: bool):
    """``fn(x)`` without the batch axis :func:`batched` added; a batch of 0 is run on one."""
    y = on_empty_batch(fn, x) if x.shape[0] == 0 else fn(x)
    return unbatched(y, was_unbatched)


def _max_pool(nd: int, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    op = f"max_pool{nd}d"
    x, was_unbatched, kernel, stride, padding, dilation, ceil_mode = _pool_geometry(
        nd, op, x, kernel_size, stride, padding, dilation, ceil_mode)
    pool = MaxPool(kernel, stride, padding, dilation, ceil_mode)
    y, indices = _run(pool.apply, x, was_unbatched)
    return (y, indices) if return_indices else y


def _avg_pool(nd: int, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override) -> Tensor:
    op = f"avg_pool{nd}d"
    x, was_unbatched, kernel, stride, padding, _, ceil_mode = _pool_geometry(
        nd, op, x, kernel_size, stride, padding, 1, ceil_mode)
    if not isinstance(count_include_pad, (bool, np.bool_)):
        raise TypeError(f"{op}: count_include_pad must be a bool, got {count_include_pad!r}")
    if divisor_override is not None:
        divisor_override = int_arg(divisor_override, op, "divisor_override")
        if divisor_override == 0:
            raise ValueError(f"{op}: divisor_override must not be zero")
    pool = AvgPool(kernel, stride, padding, ceil_mode, bool(count_include_pad),
                   divisor_override)
    return _run(pool.apply, x, was_unbatched)


def max_pool2d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, dilation: IntOrTuple = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Max pooling over (H, W), PyTorch's arguments: x (N, C, H, W) -> (N, C, OH, OW).

    ``stride`` defaults to ``kernel_size``; padding never wins; ``dilation`` spaces the taps;
    ``ceil_mode`` rounds the output size up (the last window may hang over the end, but starts
    inside the input or its left padding). With ``return_indices`` returns ``(y, indices)``:
    int64, the flat index within each (H, W) plane of the chosen input, like PyTorch's.
    """
    return _max_pool(2, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, dilation: IntOrTuple = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Max pooling over (D, H, W); arguments as :func:`max_pool2d`."""
    return _max_pool(3, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def avg_pool2d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """Average pooling over (H, W), PyTorch's arguments: x (N, C, H, W) -> (N, C, OH, OW).

    The divisor counts the window's positions inside the input and its padding
    (``count_include_pad``, the default), or inside the input only, or is ``divisor_override``.
    """
    return _avg_pool(2, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def avg_pool3d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """Average pooling over (D, H, W); arguments as :func:`avg_pool2d`."""
    return _avg_pool(3, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


class AdaptiveAvgPool(Function):
    def __init__(self, output_size: tuple[int, ...]):
        self.output_size = output_size

    def forward(self, x):
        self.kernels = dispatch.kernels(self.device)
        self.x_shape = x.shape
        return self.kernels.adaptive_avg_pool_forward(x, self.output_size)

    def backward(self, gy):
        return self.kernels.adaptive_avg_pool_backward(gy, self.x_shape)


def _adaptive(nd: int, x, output_size) -> Tensor:
    op = f"adaptive_avg_pool{nd}d"
    x, was_unbatched = batched(float_tensor(x, op, "input"), nd, op)
    if isinstance(output_size, (tuple, list)) and len(output_size) == nd:
        # None keeps the input's size along that axis (PyTorch)
        output_size = tuple(s if o is None else o for o, s in zip(output_size, x.shape[2:]))
    size = ntuple(output_size, nd, op, "output_size", 1)
    return _run(AdaptiveAvgPool(size).apply, x, was_unbatched)


def adaptive_avg_pool2d(x, output_size: IntOrTuple) -> Tensor:
    """Average over PyTorch's adaptive bins to (N, C, *output_size); 1 is global pooling."""
    return _adaptive(2, x, output_size)


def adaptive_avg_pool3d(x, output_size: IntOrTuple) -> Tensor:
    return _adaptive(3, x, output_size)
