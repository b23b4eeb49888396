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


def randomize_batch_norm(model, seed: int = 0) -> None:
    """Give every batch norm of a cnnfast model random running statistics and affine weights, so
    that a comparison in evaluation mode really exercises them (fresh ones are the identity)."""
    from cnnfast.nn.layers import BatchNormBase

    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, BatchNormBase):
            c = m.num_features
            m.running_mean.data[...] = rng.normal(0.0, 0.3, c)
            m.running_var.data[...] = rng.uniform(0.5, 2.0, c)
            m.weight.data[...] = rng.uniform(0.5, 1.5, c)
            m.bias.data[...] = rng.normal(0.0, 0.2, c)


def conv_all(kernels, case: ConvCase, x, w, gy):
    """(y, gx, gw) of one kernel path (a module or namespace with the conv contract's ops)."""
    return (kernels.conv_forward(x, w, *case.args),
            kernels.conv_backward_data(gy, w, case.x_shape, *case.args),
            kernels.conv_backward_weight(gy, x, case.w_shape, *case.args))

