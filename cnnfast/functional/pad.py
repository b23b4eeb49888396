"""``pad``: PyTorch's ``F.pad``, every mode, with its own backward.

``constant`` writes the input into a block of ``value``; ``reflect``, ``replicate`` and
``circular`` are gathers: along each padded axis, output position ``o`` reads input position
``index[o]`` (reflected about the edge without repeating it, clamped to the edge, or wrapped),
and backward scatter-adds the gradient through the same indices. Negative amounts crop. The
array code is NumPy's or CuPy's (``xp``), so one implementation serves every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np

from cnnfast import dispatch
from cnnfast.functional.checks import float_tensor
from cnnfast.tensor import Function, Tensor

MODES = ("constant", "reflect", "replicate", "circular")


class Pad(Function):
    """Constant padding (negative amounts crop); backward crops the gradient back. ``inner``
    and ``source`` index the kept block in the output and the input."""

    def __init__(self, out_shape: tuple[int, ...], inner: tuple, source: tuple, value: float):
        self.out_shape, self.inner, self.source, self.value = out_shape, inner, source, value

    def forward(self, x):
        xp = dispatch.array_xp(x)
        self.x_shape = x.shape
        out = xp.full(self.out_shape, self.value, dtype=x.dtype)
        out[self.inner] = x[self.source]
        return out

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        gx = xp.zeros(self.x_shape, dtype=gy.dtype)
        gx[self.source] = gy[self.inner]
        return gx


class GatherPad(Function):
    """``reflect`` / ``replicate`` / ``circular`` padding: ``indices`` maps each padded axis's
    output positions to input positions (int64 arrays, one per axis in ``axes``)."""

    def __init__(self, axes: tuple[int, ...], indices: tuple):
        self.axes, self.indices = axes, indices

    def forward(self, x):
        xp = dispatch.array_xp(x)
        self.x_shape = x.shape
        for axis, index in zip(self.axes, self.indices):
            x = xp.take(x, xp.asarray(index), axis=axis)
        return x

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        shape = list(gy.shape)
        for axis, index in reversed(list(zip(self.axes, self.indices))):
            shape[axis] = self.x_shape[axis]
            g = xp.zeros(shape, dtype=gy.dtype)
            moved_g, moved_gy = xp.moveaxis(g, axis, 0), xp.moveaxis(gy, axis, 0)
            if xp is np:
                np.add.at(moved_g, index, moved_gy)  # repeated source positions accumulate
            else:
                import cupyx

                cupyx.scatter_add(moved_g, xp.asarray(index), moved_gy)
            gy = g
        return gy


def _source_index(size: int, left: int, right: int, mode: str) -> np.ndarray:
    """Input position read by each output position of one axis (see the module docstring)."""
    pos = np.arange(-left, size + right)
    if mode == "replicate":
        return np.clip(pos, 0, size - 1)
    if mode == "circular":  # wraps within what cropping keeps, as PyTorch does
        start, stop = max(-left, 0), size - max(-right, 0)
        return start + (np.arange(-max(left, 0), stop - start + max(right, 0))
                        % (stop - start))
    period = 2 * (size - 1)  # reflect: ... 2 1 | 0 1 2 ... S-1 | S-2 ...
    pos = np.abs(pos) % period if period else np.zeros_like(pos)
    return np.where(pos >= size, period - pos, pos)


def pad(x, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Tensor:
    """PyTorch's ``F.pad``: ``pad = (left, right)`` for the last axis, then
    ``(left, right, top, bottom)`` for the last two, and so on (asymmetric amounts allowed;
    negative ones crop). ``mode`` is ``'constant'`` (fill with ``value``, default 0),
    ``'reflect'`` (mirror, edge not repeated: each amount < the axis size), ``'replicate'``
    (repeat the edge) or ``'circular'`` (wrap around: each amount <= the axis size). Any rank
    for constant; the other modes pad at most the last 3 axes of a batched or unbatched input,
    as in PyTorch. Any device; backward has the gradient of each.
    """
    op = "pad"
    x = float_tensor(x, op, "input")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if (not isinstance(pad, Sequence) or isinstance(pad, str) or len(pad) % 2
            or not all(isinstance(p, Integral) and not isinstance(p, bool) for p in pad)):
        raise ValueError(f"{op}: pad must be a sequence of an even number of ints, got {pad!r}")
    if len(pad) // 2 > x.ndim:
        raise ValueError(f"{op}: pad {tuple(pad)} pads {len(pad) // 2} axes but the input has "
                         f"only {x.ndim} (shape {x.shape})")
    if mode != "constant":
        if value not in (None, 0):
            raise ValueError(f"{op}: value applies to mode 'constant' only, got value={value!r} "
                             f"with mode {mode!r}")
        return _gather_pad(x, pad, mode)
    value = 0.0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: value must be a number, got {value!r}")
    out_shape, inner, source = list(x.shape), [slice(None)] * x.ndim, [slice(None)] * x.ndim
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        left, right, size = int(pad[2 * i]), int(pad[2 * i + 1]), x.shape[axis]
        out_shape[axis] = size + left + right
        if out_shape[axis] < 0:
            raise ValueError(f"{op}: pad {tuple(pad)} leaves axis {axis} of shape {x.shape} "
                             f"with size {out_shape[axis]}")
        kept = slice(max(-left, 0), max(size - max(-right, 0), max(-left, 0)))
        count = max(0, kept.stop - kept.start)
        source[axis] = kept
        inner[axis] = slice(max(left, 0), max(left, 0) + count)
    return Pad(tuple(out_shape), tuple(inner), tuple(source), float(value)).apply(x)


def _gather_pad(x: Tensor, pad: Sequence[int], mode: str) -> Tensor:
    op = "pad"
    n_axes = len(pad) // 2
    if n_axes > 3 or x.ndim not in (n_axes + 1, n_axes + 2):
        raise ValueError(f"{op}: mode {mode!r} pads the last 1-3 axes of a {n_axes + 1}-D or "
                         f"{n_axes + 2}-D input (unbatched or batched); got pad {tuple(pad)} for "
                         f"shape {x.shape}")
    axes, indices = [], []
    for i in range(n_axes):
        axis = x.ndim - 1 - i
        left, right, size = int(pad[2 * i]), int(pad[2 * i + 1]), x.shape[axis]
        limit = size - 1 if mode == "reflect" else size
        if mode != "replicate" and (left > limit or right > limit):
            raise ValueError(f"{op}: mode {mode!r} needs each amount <= {limit} for axis "
                             f"{axis} of size {size}, got pad {tuple(pad)}")
        if size == 0 or size + left + right < 0:
            raise ValueError(f"{op}: mode {mode!r} cannot pad axis {axis} of size {size} by "
                             f"({left}, {right})")
        axes.append(axis)
        indices.append(_source_index(size, left, right, mode).astype(np.int64))
    return GatherPad(tuple(axes), tuple(indices)).apply(x)


def on_empty_batch(fn, x: Tensor):
    """``fn(x)`` for a batch of 0: run on one zero sample and keep none of the result (the
    shapes and an empty gradient come out right; kernels never see N = 0)."""
    y = fn(pad(x, (0, 0) * (x.ndim - 1) + (0, 1)))
    return tuple(t[:0] for t in y) if isinstance(y, tuple) else y[:0]
