"""Shape cases and input makers shared by the kernel tests of every path (each file keeps its
own grid)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def make_array(rng, shape, dtype=np.float64, layout="contiguous"):
    """A standard-normal array of ``shape``; 'transposed' and 'sliced' give non-contiguous views."""
    shape = tuple(shape)
    if layout == "contiguous":
        return rng.standard_normal(shape).astype(dtype)
    if layout == "transposed":
        a = rng.standard_normal(shape[::-1]).astype(dtype).transpose()
    elif layout == "sliced":
        a = rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dtype)[..., ::2]
    else:
        raise ValueError(layout)
    assert a.shape == shape
    # A transposed (1, IN) row is still contiguous; every other case is a strided view.
    assert not a.flags.c_contiguous or (layout == "transposed" and 1 in shape)
    return a


class ConvCase(NamedTuple):
    """One convolution: shapes plus the contract's (stride, padding, dilation, groups)."""

    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def args(self):
        return self.stride, self.padding, self.dilation, self.groups


class PoolCase(NamedTuple):
    """One pooling: input shape plus the contract's (kernel, stride, padding)."""

    x_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]

    @property
    def args(self):
        return self.kernel, self.stride, self.padding
