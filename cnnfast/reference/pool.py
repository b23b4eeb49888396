"""Reference pooling (2D and 3D): max and average pooling, and adaptive average pooling.

Max and average pooling loop over kernel offsets; for each offset the input elements it meets
form a strided slice of the padded input with shape (N, C, *O), as in ``reference.conv``. The
padded input is zero-extended on the right by the overhang of ceil mode's last windows, so every
slice exists; padding and overhang never win a max. Average pooling's divisor is found the same
way, by pooling masks (1 inside the input, or inside the input and its padding), not by a
formula: that keeps this path independent of the fast paths, which use
:func:`cnnfast.shapes.avg_pool_divisor`. Adaptive average pooling is separable (each output is
the mean over a box of input positions), so it pools one spatial axis at a time; it runs on NumPy
and CuPy arrays alike and every path uses it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from cnnfast.backend import array_xp
from cnnfast.shapes import output_size

Ints = tuple[int, ...]


def _window(offset: Ints, out: Ints, stride: Ints, dilation: Ints) -> tuple:
    """Index (over N, C and the spatial axes) of the padded-input elements kernel offset
    ``offset`` meets: output position o meets padded position o * stride + offset * dilation."""
    spatial = tuple(slice(k * d, k * d + st * (o - 1) + 1, st)
                    for k, o, st, d in zip(offset, out, stride, dilation))
    return (slice(None), slice(None)) + spatial


def _padded_length(size: Ints, kernel: Ints, stride: Ints, padding: Ints, dilation: Ints,
                   out: Ints) -> Ints:
    """Length of the padded axis the windows need: S + 2P, or more when ceil mode's last
    window hangs over the end."""
    return tuple(max(s + 2 * p, (o - 1) * st + d * (k - 1) + 1)
                 for s, k, st, p, d, o in zip(size, kernel, stride, padding, dilation, out))


def _embed(xp, x, padding: Ints, length: Ints):
    """``x`` (N, C, *S) inside zeros of shape (N, C, *length), starting at ``padding``."""
    padded = xp.zeros(tuple(x.shape[:2]) + tuple(length), dtype=x.dtype)
    padded[(slice(None), slice(None)) + tuple(slice(p, p + s) for s, p in
                                              zip(x.shape[2:], padding))] = x
    return padded


def _kernel_offsets(kernel: Ints):
    return itertools.product(*(range(k) for k in kernel))


def _ones(kernel: Ints) -> Ints:
    return (1,) * len(kernel)


def max_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints, dilation: Ints | None = None,
                     ceil_mode: bool = False):
    """Max pooling; padding (and ceil mode's overhang) never wins.

    x (N, C, *S) -> (y, idx), both (N, C, *O), O from :func:`cnnfast.shapes.output_size`.
    ``idx`` (int64) is the flat index, within one (n, c) plane of the unpadded input, of the
    first maximum in window scan order (a NaN counts as a maximum, as in PyTorch).
    """
    xp = array_xp(x)
    dilation = dilation or _ones(kernel)
    size = tuple(x.shape[2:])
    out = output_size(size, kernel, stride, padding, dilation, ceil_mode)
    x_padded = _embed(xp, x, padding, _padded_length(size, kernel, stride, padding, dilation, out))
    y = xp.zeros(x.shape[:2] + out, dtype=x.dtype)
    idx = xp.full(x.shape[:2] + out, -1, dtype=xp.int64)
    plane_strides = [math.prod(size[axis + 1:]) for axis in range(len(size))]
    for offset in _kernel_offsets(kernel):
        # Unpadded coordinates this offset meets, per spatial axis, broadcast to O.
        flat = np.zeros(out, dtype=np.int64)
        inside = np.ones(out, dtype=bool)
        for axis, (k, o, st, p, d, s) in enumerate(zip(offset, out, stride, padding, dilation,
                                                       size)):
            coord = np.arange(o) * st - p + k * d
            view = [1] * len(out)
            view[axis] = o
            coord = coord.reshape(view)
            inside = inside & (coord >= 0) & (coord < s)
            flat = flat + coord * plane_strides[axis]
        value = x_padded[_window(offset, out, stride, dilation)]
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


def _avg_geometry(xp, size: Ints, kernel: Ints, stride: Ints, padding: Ints, ceil_mode: bool,
                  count_include_pad: bool, divisor_override: int | None, dtype):
    """(O, padded length, divisor (*O)) of average pooling. The divisor counts, per window, the
    ones of a mask over the padded axis: the input and its padding (``count_include_pad``) or
    the input only; ``divisor_override`` replaces it everywhere."""
    ones = _ones(kernel)
    out = output_size(size, kernel, stride, padding, None, ceil_mode)
    length = _padded_length(size, kernel, stride, padding, ones, out)
    if divisor_override is not None:
        return out, length, xp.asarray(np.full(out, divisor_override, dtype=dtype))
    mask = np.zeros((1, 1) + length)
    region = padding if count_include_pad else (0,) * len(size)
    mask[(0, 0) + tuple(slice(p - r, p + s + r) for s, p, r in zip(size, padding, region))] = 1
    count = sum(mask[_window(offset, out, stride, ones)] for offset in _kernel_offsets(kernel))
    return out, length, xp.asarray(count[0, 0].astype(dtype))


def avg_pool_forward(x, kernel: Ints, stride: Ints, padding: Ints, ceil_mode: bool = False,
                     count_include_pad: bool = True, divisor_override: int | None = None):
    """Average pooling: each window's in-bounds sum over its divisor.

    x (N, C, *S) -> y (N, C, *O), O from :func:`cnnfast.shapes.output_size`. The divisor is the
    number of window positions inside the input and its padding (``count_include_pad``, PyTorch's
    default: prod(kernel) except where ceil mode's last window hangs over), or inside the input
    only, or ``divisor_override``.
    """
    xp = array_xp(x)
    out, length, divisor = _avg_geometry(xp, tuple(x.shape[2:]), kernel, stride, padding,
                                         ceil_mode, count_include_pad, divisor_override, x.dtype)
    x_padded = _embed(xp, x, padding, length)
    total = xp.zeros(x.shape[:2] + out, dtype=x.dtype)
    for offset in _kernel_offsets(kernel):
        total += x_padded[_window(offset, out, stride, _ones(kernel))]
    return total / divisor


def avg_pool_backward(gy, x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints,
                      ceil_mode: bool = False, count_include_pad: bool = True,
                      divisor_override: int | None = None):
    """Gradient of avg_pool_forward: gy (N, C, *O) -> gx (x_shape = (N, C, *S))."""
    xp = array_xp(gy)
    x_shape = tuple(x_shape)
    out, length, divisor = _avg_geometry(xp, x_shape[2:], kernel, stride, padding, ceil_mode,
                                         count_include_pad, divisor_override, gy.dtype)
    gx_padded = xp.zeros(x_shape[:2] + length, dtype=gy.dtype)
    share = gy / divisor
    for offset in _kernel_offsets(kernel):
        # A strided slice has no repeated elements, so += on the view is a correct scatter.
        gx_padded[_window(offset, out, stride, _ones(kernel))] += share
    inner = (slice(None), slice(None)) + tuple(slice(p, p + s) for s, p in
                                               zip(x_shape[2:], padding))
    return xp.ascontiguousarray(gx_padded[inner])


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
