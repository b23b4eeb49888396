"""Shape cases shared by the kernel tests of every path (each file keeps its own grid)."""

from __future__ import annotations

from typing import NamedTuple


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
