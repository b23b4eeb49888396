"""Reference pooling (2D and 3D): max and average pooling, and adaptive average pooling.

Max and average pooling loop over kernel offsets; for each offset the input elements it meets
form a strided slice of the padded input with shape (N, C, *O), as in ``reference.conv``.
Adaptive average pooling is separable (each output is the mean over a box of input positions),
so it pools one spatial axis at a time; it runs on NumPy and CuPy arrays alike and every path
uses it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from cnnfast.backend import array_xp
from cnnfast.shapes import output_size

Ints = tuple[int, ...]




def _window(offset: Ints, out: Ints, stride: Ints) -> tuple:
    """Index (over N, C and the spatial axes) of the padded-input elements offset ``offset`` meets.

    Output position o meets padded position o * stride + offset.
    """
    spatial = tuple(slice(k, k + st * (o - 1) + 1, st) for k, o, st in zip(offset, out, stride))
    return (slice(None), slice(None)) + spatial


def _interior(size: Ints, padding: Ints) -> tuple:
    """Index of the unpadded region inside a padded (N, C, *(S + 2P)) array."""
    return (slice(None), slice(None)) + tuple(slice(p, p + s) for s, p in zip(size, padding))


def _padded_zeros(xp, shape: Ints, padding: Ints, dtype):
    return xp.zeros(tuple(shape[:2]) + tuple(s + 2 * p for s, p in zip(shape[2:], padding)),
                    dtype=dtype)


def _kernel_offsets(kernel: Ints):
    return itertools.product(*(range(k) for k in kernel))


def max_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints):
    """Max pooling (floor mode); padding never wins.

    x (N, C, *S) -> (y, idx), both (N, C, *O) with O = (S + 2P - KS) // stride + 1.
    ``idx`` (int64) is the flat index, within one (n, c) plane of the unpadded input, of the
    first maximum in window scan order (a NaN counts as a maximum, as in PyTorch).
    """
    xp = array_xp(x)
    size = tuple(x.shape[2:])
    out = output_size(size, kernel, stride, padding)
    x_padded = _padded_zeros(xp, x.shape, padding, x.dtype)
    x_padded[_interior(size, padding)] = x
    y = xp.zeros(x.shape[:2] + out, dtype=x.dtype)
    idx = xp.full(x.shape[:2] + out, -1, dtype=xp.int64)
    plane_strides = [math.prod(size[axis + 1:]) for axis in range(len(size))]
    for offset in _kernel_offsets(kernel):
        # Unpadded coordinates this offset meets, per spatial axis, broadcast to O.
        flat = np.zeros(out, dtype=np.int64)
        inside = np.ones(out, dtype=bool)
        for axis, (k, o, st, p, s) in enumerate(zip(offset, out, stride, padding, size)):
            coord = np.arange(o) * st - p + k
            view = [1] * len(out)
            view[axis] = o
            coord = coord.reshape(view)
            inside = inside & (coord >= 0) & (coord < s)
            flat = flat + coord * plane_strides[axis]
        value = x_padded[_window(offset, out, stride)]
        # Padding is never a candidate; the first in-bounds element starts the window.
        better = xp.asarray(inside) & ((idx < 0) | (value > y) | xp.isnan(value))
        y = xp.where(better, value, y)
        idx = xp.where(better, xp.asarray(flat), idx)
    return y, idx


def max_pool_backward(gy, idx, x_shape: Ints):
    """Gradient of max pooling: gy (N, C, *O), idx (N, C, *O) int64 -> gx (x_shape = (N, C, *S)).

    Each gy element goes to the input element its idx names; overlapping windows accumulate.
    """
    xp = array_xp(gy)
    x_shape = tuple(x_shape)
    planes = x_shape[0] * x_shape[1]
    gx = xp.zeros((planes, math.prod(x_shape[2:])), dtype=gy.dtype)
    rows = xp.arange(planes).reshape(planes, 1)
    # add.at accumulates repeated indices (unbuffered), in a fixed order.
    xp.add.at(gx, (rows, idx.reshape(planes, -1)), gy.reshape(planes, -1))
    return gx.reshape(x_shape)


def avg_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints):
    """Average pooling (floor mode) counting padding in the divisor prod(kernel).

    x (N, C, *S) -> y (N, C, *O) with O = (S + 2P - KS) // stride + 1.
    """
    xp = array_xp(x)
    size = tuple(x.shape[2:])
    out = output_size(size, kernel, stride, padding)
    x_padded = _padded_zeros(xp, x.shape, padding, x.dtype)
    x_padded[_interior(size, padding)] = x
    total = xp.zeros(x.shape[:2] + out, dtype=x.dtype)
    for offset in _kernel_offsets(kernel):
        total += x_padded[_window(offset, out, stride)]
    return total / x.dtype.type(math.prod(kernel))


def avg_pool_backward(gy, x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints):
    """Gradient of avg_pool_forward: gy (N, C, *O) -> gx (x_shape = (N, C, *S))."""
    xp = array_xp(gy)
    x_shape = tuple(x_shape)
    out = tuple(gy.shape[2:])
    gx_padded = _padded_zeros(xp, x_shape, padding, gy.dtype)
    share = gy / gy.dtype.type(math.prod(kernel))
    for offset in _kernel_offsets(kernel):
        # A strided slice has no repeated elements, so += on the view is a correct scatter.
        gx_padded[_window(offset, out, stride)] += share
    return xp.ascontiguousarray(gx_padded[_interior(x_shape[2:], padding)])


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling bins along one axis: [floor(i*S/O), ceil((i+1)*S/O))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _along(axis: int, ndim: int, index) -> tuple:
    """An index selecting ``index`` on ``axis`` and everything on the other axes."""
    return (slice(None),) * axis + (index,) + (slice(None),) * (ndim - axis - 1)


def _split_shape(shape, out_size, ones: bool = False) -> tuple:
    """(N, C, S1, S2, ...) -> (N, C, O1, S1/O1, O2, S2/O2, ...) (bin sizes 1 with ``ones``)."""
    split = tuple(shape[:2])
    for s, o in zip(shape[2:], out_size):
        split += (o, 1 if ones else s // o)
    return split


def _bin_axes(nd: int) -> tuple:
    return tuple(3 + 2 * i for i in range(nd))


def adaptive_avg_pool_forward(x, out_size: Ints):
    """Adaptive average pooling: x (N, C, *S) -> y (N, C, *out_size).

    Output i along an axis is the mean of input positions [floor(i*S/O), ceil((i+1)*S/O)).
    """
    xp = array_xp(x)
    if all(s % o == 0 for s, o in zip(x.shape[2:], out_size)):
        # Equal bins of k = S / O (global average pooling is O = 1): one reshape and one mean.
        y = x.reshape(_split_shape(x.shape, out_size)).mean(axis=_bin_axes(len(out_size)))
        return xp.ascontiguousarray(y).astype(x.dtype, copy=False)
    y = x
    for axis, o in zip(range(2, x.ndim), out_size):
        pieces = [
            y[_along(axis, y.ndim, slice(start, end))].mean(axis=axis, keepdims=True)
            for start, end in adaptive_bins(y.shape[axis], o)
        ]
        y = xp.concatenate(pieces, axis=axis)
    return xp.ascontiguousarray(y).astype(x.dtype, copy=False)


def adaptive_avg_pool_backward(gy, x_shape: Ints):
    """Gradient of adaptive_avg_pool_forward: gy (N, C, *O) -> gx (x_shape = (N, C, *S))."""
    xp = array_xp(gy)
    x_shape = tuple(x_shape)
    out_size = gy.shape[2:]
    if all(s % o == 0 for s, o in zip(x_shape[2:], out_size)):
        count = int(np.prod([s // o for s, o in zip(x_shape[2:], out_size)]))
        share = (gy / gy.dtype.type(count)).reshape(_split_shape(gy.shape, out_size, ones=True))
        return xp.ascontiguousarray(
            xp.broadcast_to(share, _split_shape(x_shape, out_size)).reshape(x_shape))
    g = gy
    # The forward pools axis 2, then 3, ...; undo them in reverse order.
    for axis in reversed(range(2, gy.ndim)):
        size = x_shape[axis]
        spread = xp.zeros(g.shape[:axis] + (size,) + g.shape[axis + 1:], dtype=gy.dtype)
        for i, (start, end) in enumerate(adaptive_bins(size, g.shape[axis])):
            share = g[_along(axis, g.ndim, slice(i, i + 1))] / gy.dtype.type(end - start)
            spread[_along(axis, g.ndim, slice(start, end))] += share
        g = spread
    return g
