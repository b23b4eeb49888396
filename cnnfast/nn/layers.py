"""Layers: convolution, pooling, activation, batch norm, linear, dropout, shape helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cnnfast import functional as F
from cnnfast import rng as _rng
from cnnfast.nn import init
from cnnfast.nn.module import Module, Parameter
from cnnfast.shapes import ntuple
from cnnfast.tensor import Tensor

IntOrTuple = int | Sequence[int]


class Identity(Module):
    def forward(self, x):
        return x


def _runs_own_forward(module: Module, cls: type) -> bool:
    """True when ``module.forward`` is ``cls.forward`` itself: neither a subclass nor the
    instance (a profiler's wrapper, say) has put another in its place."""
    return type(module).forward is cls.forward and "forward" not in module.__dict__


class Sequential(Module):
    """Runs its modules in order.

    With ``fuse_relu`` (the default) a convolution or batch norm followed by ``ReLU`` runs as
    one fused op (:func:`cnnfast.functional.conv2d_relu`, ...): the same values, and on ``cuda``
    one kernel launch fewer. Only layers whose forward is their class's own are fused (see
    :meth:`fused_pairs`); a layer or ReLU with another forward, on its subclass or on the
    instance, runs as written.
    """

    def __init__(self, *modules: Module, fuse_relu: bool = True):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self.fuse_relu = bool(fuse_relu)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def fused_pairs(self) -> list[int]:
        """Positions ``i`` whose module runs fused with the ``ReLU`` at ``i + 1``."""
        if not self.fuse_relu:
            return []
        modules = list(self._modules.values())
        return [i for i in range(len(modules) - 1)
                if type(modules[i + 1]) is ReLU and _runs_own_forward(modules[i + 1], ReLU)
                and getattr(modules[i], "fuses_relu", lambda: False)()]

    def forward(self, x):
        modules = list(self._modules.values())
        fused = set(self.fused_pairs())
        i = 0
        while i < len(modules):
            if i in fused:
                x = modules[i].forward_relu(x)
                i += 2
            else:
                x = modules[i](x)
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
        kernel = ntuple(kernel_size, self.nd, name, "kernel_size", 1)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride = ntuple(stride, self.nd, name, "stride", 1)
        self.padding = ntuple(padding, self.nd, name, "padding", 0)
        self.dilation = ntuple(dilation, self.nd, name, "dilation", 1)
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

    def fuses_relu(self) -> bool:
        """Whether :meth:`forward_relu` runs one fused op (this class's own forward)."""
        return _runs_own_forward(self, (Conv2d, Conv3d)[self.nd - 2])

    def forward_relu(self, x):
        """``relu(self(x))``, as one fused op when :meth:`fuses_relu`."""
        if not self.fuses_relu():
            return F.relu(self(x))
        fused = F.conv2d_relu if self.nd == 2 else F.conv3d_relu
        return fused(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)


class Conv2d(_ConvNd):
    """2D convolution; weight (K, C/groups, KH, KW) with PyTorch's default init."""

    nd = 2

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Conv3d(_ConvNd):
    """3D convolution; weight (K, C/groups, KD, KH, KW)."""

    nd = 3

    def forward(self, x):
        return F.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


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
        return self._forward(x, F.batch_norm)

    def fuses_relu(self) -> bool:
        """Whether :meth:`forward_relu` runs one fused op (batch norm's own forward)."""
        return _runs_own_forward(self, _BatchNorm)

    def forward_relu(self, x):
        """``relu(self(x))``, as one fused op when :meth:`fuses_relu`."""
        if not self.fuses_relu():
            return F.relu(self(x))
        return self._forward(x, F.batch_norm_relu)

    def _forward(self, x, op):
        if isinstance(x, Tensor) and x.ndim != self.nd + 2:
            raise ValueError(f"{type(self).__name__}: input must be {self.nd + 2}-D, "
                             f"got shape {x.shape}")
        training = self.training or self.running_mean is None
        return op(x, self.running_mean, self.running_var, self.weight, self.bias,
                  training=training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, H, W) per channel of (N, C, H, W)."""

    nd = 2


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, D, H, W) per channel of (N, C, D, H, W)."""

    nd = 3
