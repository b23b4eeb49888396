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

# nn's padding_mode -> F.pad's mode
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
                 "circular": "circular"}


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
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None,
                 dtype=np.float32, rng=None):
        super().__init__()
        name = type(self).__name__
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {PADDING_MODES}, "
                             f"got {padding_mode!r}")
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
        self.dilation = ntuple(dilation, self.nd, name, "dilation", 1)
        if padding == "same" and max(self.stride) > 1:
            raise ValueError(f"{name}: padding='same' needs stride 1, got stride {self.stride}")
        self.padding = (padding if padding in ("same", "valid")
                        else ntuple(padding, self.nd, name, "padding", 0))
        self.groups, self.padding_mode = groups, padding_mode
        generator = _rng.resolve(rng)
        self.weight = Parameter(np.empty((out_channels, in_channels // groups) + kernel, dtype))
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)  # PyTorch default
        if bias:
            bound = 1 / math.sqrt(init.fan_in_and_out(self.weight.shape)[0])
            self.bias = Parameter(np.empty(out_channels, dtype))
            init.uniform_(self.bias, -bound, bound, generator)
        else:
            self.bias = None
        if device is not None:
            self.to(device)

    def _conv(self, x, op):
        """``op`` (conv2d, conv3d_relu, ...) on ``x``; a padding mode other than zeros pads
        ``x`` first with :func:`cnnfast.functional.pad` (as PyTorch does)."""
        padding = self.padding
        if self.padding_mode != "zeros":
            if padding == "same":
                totals = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
                sides = [(t // 2, t - t // 2) for t in totals]
            else:
                sides = [(0, 0)] * self.nd if padding == "valid" else [(p, p) for p in padding]
            amounts = [a for side in reversed(sides) for a in side]
            x = F.pad(x, amounts, mode=PADDING_MODES[self.padding_mode])
            padding = 0
        return op(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def forward(self, x):
        return self._conv(x, F.conv2d if self.nd == 2 else F.conv3d)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}"
                + (f", dilation={self.dilation}" if max(self.dilation) > 1 else "")
                + (f", groups={self.groups}" if self.groups > 1 else "")
                + (", bias=False" if self.bias is None else ""))

    def fuses_relu(self) -> bool:
        """Whether :meth:`forward_relu` runs one fused op (this class's own forward)."""
        return _runs_own_forward(self, _ConvNd)

    def forward_relu(self, x):
        """``relu(self(x))``, as one fused op when :meth:`fuses_relu`."""
        if not self.fuses_relu():
            return F.relu(self(x))
        return self._conv(x, F.conv2d_relu if self.nd == 2 else F.conv3d_relu)


class Conv2d(_ConvNd):
    """2D convolution; weight (K, C/groups, KH, KW) with PyTorch's default init."""

    nd = 2


class Conv3d(_ConvNd):
    """3D convolution; weight (K, C/groups, KD, KH, KW)."""

    nd = 3


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
    """max(x, 0). ``inplace`` is accepted for PyTorch code and changes nothing: the result is
    always a new tensor (the same values)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return F.relu(x)


class Softmax(Module):
    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.softmax(x, -1 if self.dim is None else self.dim)


class LogSoftmax(Softmax):
    def forward(self, x):
        return F.log_softmax(x, -1 if self.dim is None else self.dim)


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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
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
        if device is not None:
            self.to(device)

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


class BatchNormBase(Module):
    nd = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=np.float32, *, bias: bool = True):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, "
                             f"got {num_features!r}")
        if momentum is None:
            raise ValueError(f"{type(self).__name__}: momentum=None (PyTorch's cumulative "
                             f"average) is not supported; give a number such as 0.1")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", Tensor(np.zeros(num_features, dtype)))
            self.register_buffer("running_var", Tensor(np.ones(num_features, dtype)))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        if device is not None:
            self.to(device)

    def forward(self, x):
        return self._forward(x, F.batch_norm)

    def fuses_relu(self) -> bool:
        """Whether :meth:`forward_relu` runs one fused op (batch norm's own forward)."""
        return _runs_own_forward(self, BatchNormBase)

    def forward_relu(self, x):
        """``relu(self(x))``, as one fused op when :meth:`fuses_relu`."""
        if not self.fuses_relu():
            return F.relu(self(x))
        return self._forward(x, F.batch_norm_relu)

    def _forward(self, x, op):
        ranks = (2, 3) if self.nd == 1 else (self.nd + 2,)
        if isinstance(x, Tensor) and x.ndim not in ranks:
            raise ValueError(f"{type(self).__name__}: input must be "
                             f"{' or '.join(f'{r}-D' for r in ranks)}, got shape {x.shape}")
        training = self.training or self.running_mean is None
        return op(x, self.running_mean, self.running_var, self.weight, self.bias,
                  training=training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(BatchNormBase):
    """Batch norm over (N, H, W) per channel of (N, C, H, W)."""

    nd = 2


class BatchNorm3d(BatchNormBase):
    """Batch norm over (N, D, H, W) per channel of (N, C, D, H, W)."""

    nd = 3


class BatchNorm1d(BatchNormBase):
    """Batch norm per channel of (N, C) or (N, C, L)."""

    nd = 1


class _Pad(Module):
    """``F.pad`` as a module, PyTorch's ``*PadNd``: ``padding`` an int (every side of the last
    ``nd`` axes) or ``2 * nd`` ints, last axis first ``(left, right, top, bottom, ...)``."""

    nd, mode = 0, "constant"

    def __init__(self, padding: IntOrTuple):
        super().__init__()
        if isinstance(padding, int) and not isinstance(padding, bool):
            padding = (padding,) * (2 * self.nd)
        padding = tuple(padding)
        if len(padding) != 2 * self.nd:
            raise ValueError(f"{type(self).__name__}: padding must be an int or "
                             f"{2 * self.nd} ints, got {padding!r}")
        self.padding = padding

    def forward(self, x):
        return F.pad(x, self.padding, self.mode)

    def extra_repr(self) -> str:
        return f"{self.padding}"


class ConstantPad1d(_Pad):
    """Pad the last axis with ``value``."""

    nd = 1

    def __init__(self, padding: IntOrTuple, value: float):
        super().__init__(padding)
        self.value = value

    def forward(self, x):
        return F.pad(x, self.padding, "constant", self.value)


class ConstantPad2d(ConstantPad1d):
    nd = 2


class ConstantPad3d(ConstantPad1d):
    nd = 3


class ZeroPad1d(_Pad):
    """Pad with zeros."""

    nd = 1


class ZeroPad2d(ZeroPad1d):
    nd = 2


class ZeroPad3d(ZeroPad1d):
    nd = 3


class ReflectionPad1d(_Pad):
    """Mirror at the edges (the edge itself not repeated)."""

    nd, mode = 1, "reflect"


class ReflectionPad2d(ReflectionPad1d):
    nd = 2


class ReflectionPad3d(ReflectionPad1d):
    nd = 3


class ReplicationPad1d(_Pad):
    """Repeat the edge values."""

    nd, mode = 1, "replicate"


class ReplicationPad2d(ReplicationPad1d):
    nd = 2


class ReplicationPad3d(ReplicationPad1d):
    nd = 3


class CircularPad1d(_Pad):
    """Wrap around."""

    nd, mode = 1, "circular"


class CircularPad2d(CircularPad1d):
    nd = 2


class CircularPad3d(CircularPad1d):
    nd = 3
