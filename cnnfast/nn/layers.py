"""Layers: convolution, pooling, activation, batch norm, linear, dropout, shape helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cnnfast import functional as F
from cnnfast import rng as _rng
from cnnfast.nn import init
from cnnfast.nn.module import Module, Parameter
from cnnfast.tensor import Tensor

IntOrTuple = int | Sequence[int]


class Identity(Module):
    def forward(self, x):
        return x


class Sequential(Module):
    """Runs its modules in order."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def forward(self, x):
        # A layer with ``forward_relu`` (convolution, batch norm) followed by ReLU runs as one
        # fused op: the same result, and on the cuda device fewer kernel launches.
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            m = modules[i]
            if (i + 1 < len(modules) and type(modules[i + 1]) is ReLU
                    and hasattr(m, "forward_relu")):
                x = m.forward_relu(x)
                i += 2
            else:
                x = m(x)
                i += 1
        return x


class _ConvNd(Module):
    nd = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 groups: int = 1, bias: bool = True, dtype=np.float32, rng=None):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels),
                           ("groups", groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        kernel = F._ntuple(kernel_size, self.nd, name, "kernel_size", 1)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride = F._ntuple(stride, self.nd, name, "stride", 1)
        self.padding = F._ntuple(padding, self.nd, name, "padding", 0)
        self.dilation = F._ntuple(dilation, self.nd, name, "dilation", 1)
        self.groups = groups
        generator = _rng.resolve(rng)
        self.weight = Parameter(np.empty((out_channels, in_channels // groups) + kernel, dtype))
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)  # PyTorch default
        if bias:
            bound = 1 / math.sqrt(init.fan_in_and_out(self.weight.shape)[0])
            self.bias = Parameter(np.empty(out_channels, dtype))
            init.uniform_(self.bias, -bound, bound, generator)
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}"
                + (f", dilation={self.dilation}" if max(self.dilation) > 1 else "")
                + (f", groups={self.groups}" if self.groups > 1 else "")
                + (", bias=False" if self.bias is None else ""))


class Conv2d(_ConvNd):
    """2D convolution; weight (K, C/groups, KH, KW) with PyTorch's default init."""

    nd = 2

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def forward_relu(self, x):
        """``relu(self(x))``, as one op unless a subclass has its own forward."""
        if type(self).forward is not Conv2d.forward:
            return F.relu(self(x))
        return F._conv(2, x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                       self.groups, relu=True)


class Conv3d(_ConvNd):
    """3D convolution; weight (K, C/groups, KD, KH, KW)."""

    nd = 3

    def forward(self, x):
        return F.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def forward_relu(self, x):
        """``relu(self(x))``, as one op unless a subclass has its own forward."""
        if type(self).forward is not Conv3d.forward:
            return F.relu(self(x))
        return F._conv(3, x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                       self.groups, relu=True)


class _MaxPool(Module):
    """Max pooling with PyTorch's arguments (see :func:`cnnfast.functional.max_pool2d`)."""

    function = None

    def __init__(self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
                 padding: IntOrTuple = 0, dilation: IntOrTuple = 1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.return_indices, self.ceil_mode = dilation, return_indices, ceil_mode

    def forward(self, x):
        return type(self).function(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                   self.ceil_mode, self.return_indices)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class _AvgPool(Module):
    """Average pooling with PyTorch's arguments (see :func:`cnnfast.functional.avg_pool2d`)."""

    function = None

    def __init__(self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
                 padding: IntOrTuple = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override

    def forward(self, x):
        return type(self).function(x, self.kernel_size, self.stride, self.padding,
                                   self.ceil_mode, self.count_include_pad, self.divisor_override)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}, count_include_pad={self.count_include_pad}")


class MaxPool2d(_MaxPool):
    function = staticmethod(F.max_pool2d)


class MaxPool3d(_MaxPool):
    function = staticmethod(F.max_pool3d)


class AvgPool2d(_AvgPool):
    function = staticmethod(F.avg_pool2d)


class AvgPool3d(_AvgPool):
    function = staticmethod(F.avg_pool3d)


class ConstantPad(Module):
    """``F.pad(x, padding, value=value)`` as a module (PyTorch's ``ConstantPadNd``; ``padding``
    last axis first: ``(left, right, top, bottom, ...)``)."""

    def __init__(self, padding: Sequence[int], value: float = 0.0):
        super().__init__()
        self.padding, self.value = tuple(padding), value

    def forward(self, x):
        return F.pad(x, self.padding, "constant", self.value)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, value={self.value}"


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size: IntOrTuple = 1):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)


class AdaptiveAvgPool3d(AdaptiveAvgPool2d):
    def forward(self, x):
        return F.adaptive_avg_pool3d(x, self.output_size)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return x.flatten(self.start_dim, self.end_dim)


class Linear(Module):
    """y = x @ weight.T + bias; weight (OUT, IN) with PyTorch's default init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype=np.float32, rng=None):
        super().__init__()
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Linear: {arg} must be a positive int, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        generator = _rng.resolve(rng)
        self.weight = Parameter(np.empty((out_features, in_features), dtype))
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = Parameter(np.empty(out_features, dtype))
            init.uniform_(self.bias, -bound, bound, generator)
        else:
            self.bias = None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Dropout(Module):
    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p!r}")
        self.p, self.rng = p, rng

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)


class _BatchNorm(Module):
    nd = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype=np.float32):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, "
                             f"got {num_features!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", Tensor(np.zeros(num_features, dtype)))
            self.register_buffer("running_var", Tensor(np.ones(num_features, dtype)))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)

    def forward(self, x):
        return self._forward(x, relu=False)

    def forward_relu(self, x):
        """``relu(self(x))``, as one op unless a subclass has its own forward."""
        if type(self).forward is not _BatchNorm.forward:
            return F.relu(self(x))
        return self._forward(x, relu=True)

    def _forward(self, x, relu: bool):
        if isinstance(x, Tensor) and x.ndim != self.nd + 2:
            raise ValueError(f"{type(self).__name__}: input must be {self.nd + 2}-D, "
                             f"got shape {x.shape}")
        training = self.training or self.running_mean is None
        return F._batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             training=training, momentum=self.momentum, eps=self.eps, relu=relu)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, H, W) per channel of (N, C, H, W)."""

    nd = 2


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, D, H, W) per channel of (N, C, D, H, W)."""

    nd = 3
