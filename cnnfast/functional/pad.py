"""``pad``: PyTorch's ``F.pad``."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np

from cnnfast import dispatch
from cnnfast.functional.checks import float_tensor
from cnnfast.tensor import Function, Tensor


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


def pad(x, pad: Sequence[int], mode: str = "constant", value: float = 0.0) -> Tensor:
    """PyTorch's ``F.pad`` (constant mode): ``pad = (left, right)`` for the last axis, then
    ``(left, right, top, bottom)`` for the last two, and so on (asymmetric amounts allowed;
    negative ones crop). Any rank, any device; the gradient is the cropped output gradient.
    """
    op = "pad"
    x = float_tensor(x, op, "input")
    if mode != "constant":
        raise ValueError(f"{op}: mode must be 'constant' (the only mode cnnfast implements), "
                         f"got {mode!r}")
    if (not isinstance(pad, Sequence) or isinstance(pad, str) or len(pad) % 2
            or not all(isinstance(p, Integral) and not isinstance(p, bool) for p in pad)):
        raise ValueError(f"{op}: pad must be a sequence of an even number of ints, got {pad!r}")
    if len(pad) // 2 > x.ndim:
        raise ValueError(f"{op}: pad {tuple(pad)} pads {len(pad) // 2} axes but the input has "
                         f"only {x.ndim} (shape {x.shape})")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: value must be a number, got {value!r}")
    out_shape, inner, source = list(x.shape), [slice(None)] * x.ndim, [slice(None)] * x.ndim
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        left, right, size = int(pad[2 * i]), int(pad[2 * i + 1]), x.shape[axis]
        out_shape[axis] = size + left + right
        if out_shape[axis] < 1:
            raise ValueError(f"{op}: pad {tuple(pad)} leaves axis {axis} of shape {x.shape} "
                             f"with size {out_shape[axis]}")
        kept = slice(max(-left, 0), size - max(-right, 0))
        count = max(0, kept.stop - kept.start)
        source[axis] = kept
        inner[axis] = slice(max(left, 0), max(left, 0) + count)
    return Pad(tuple(out_shape), tuple(inner), tuple(source), float(value)).apply(x)
