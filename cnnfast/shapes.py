"""Output sizes of sliding-window ops (convolution, pooling) and the 2D -> 3D lift: a leaf.

One formula, PyTorch's, for every path (``reference/``, ``cpu/``, ``cuda/`` conv and pool):

    O = floor((S + 2P - D * (KS - 1) - 1) / stride) + 1        (ceil_mode=False)
    O = ceil((S + 2P - D * (KS - 1) - 1) / stride) + 1         (ceil_mode=True), then
        O -= 1 when the last window would start at or past S + P (PyTorch's rule: the last
        window must start inside the input or its left padding)

with ``D`` the dilation (1 for pooling). The fast paths work in 3D form, a 2D op being a 3D op
of depth 1: :func:`lift3` pads a 2-tuple of spatial parameters to 3, depth first.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

Ints = tuple[int, ...]


def lift3(values, fill: int) -> tuple[int, int, int]:
    """A 2- or 3-tuple of spatial parameters as a 3-tuple (depth first), missing axes ``fill``
    (1 for sizes, kernels, strides, dilations; 0 for padding)."""
    values = tuple(int(v) for v in values)
    if not 1 <= len(values) <= 3:
        raise ValueError(f"expected 1 to 3 spatial values, got {values}")
    return (int(fill),) * (3 - len(values)) + values


def output_length(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                  ceil_mode: bool = False) -> int:
    """The output length along one axis (see the module docstring); may be 0 or negative when
    the window does not fit, which callers validate."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:  # the last window starts in the right padding
        out -= 1
    return out


def output_size(size: Ints, kernel: Ints, stride: Ints, padding: Ints,
                dilation: Ints | None = None, ceil_mode: bool = False) -> Ints:
    """Output spatial shape ``O`` of a conv or pool over spatial shape ``size`` (any rank; pass
    :func:`lift3`-ed tuples to get the 3D form). ``dilation`` None means 1 on every axis."""
    if dilation is None:
        dilation = (1,) * len(size)
    return tuple(output_length(int(s), int(k), int(st), int(p), int(d), ceil_mode)
                 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation))


def avg_pool_divisor(size: Ints, kernel: Ints, stride: Ints, padding: Ints, out: Ints,
                     count_include_pad: bool = True, divisor_override: int | None = None):
    """Average pooling's divisor per output position, a float64 array of shape ``out``
    (PyTorch's rule, a product over axes since windows are boxes):

    * ``divisor_override`` everywhere when given;
    * ``count_include_pad``: the window's length inside the input and its padding,
      ``min(start + K, S + P) - start`` with ``start = o * stride - P`` (``K`` except where ceil
      mode's last window hangs over the end);
    * otherwise its length inside the input, ``min(start + K, S) - max(start, 0)``.
    """
    import numpy as np

    if divisor_override is not None:
        return np.full(tuple(out), float(divisor_override))
    divisor = np.ones(tuple(out))
    for axis, (s, k, st, p, o) in enumerate(zip(size, kernel, stride, padding, out)):
        start = np.arange(o) * st - p
        if count_include_pad:
            length = np.minimum(start + k, s + p) - start
        else:
            length = np.minimum(start + k, s) - np.maximum(start, 0)
        view = [1] * len(out)
        view[axis] = o
        divisor = divisor * length.reshape(view)
    return divisor


def ntuple(value, nd: int, op: str, name: str, minimum: int) -> tuple[int, ...]:
    """An int, a length-``nd`` sequence of ints or a 1-sequence (PyTorch spreads it over every
    axis), each >= ``minimum``, as a tuple."""
    if isinstance(value, Sequence) and len(value) == 1 and nd != 1:
        value = value[0]
    if isinstance(value, Integral) and not isinstance(value, bool):
        values = (int(value),) * nd
    elif (isinstance(value, Sequence) and len(value) == nd
          and all(isinstance(v, Integral) and not isinstance(v, bool) for v in value)):
        values = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{op}: {name} must be an int or a tuple of {nd} ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum} in every dimension, got {value!r}")
    return values
