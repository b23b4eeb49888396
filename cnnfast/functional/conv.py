"""Convolution: ``conv2d``, ``conv3d`` and their fused-ReLU forms."""

from __future__ import annotations

from numbers import Integral

from cnnfast import dispatch
from cnnfast.functional.checks import IntOrTuple, batched, check_same, float_tensor, unbatched
from cnnfast.functional.pad import on_empty_batch, pad
from cnnfast.shapes import ntuple
from cnnfast.tensor import Function, Tensor


class Conv(Function):
    """Convolution (cross-correlation) with optional bias, any spatial rank the kernels accept;
    ``relu`` applies a ReLU to the output in the same op (:func:`conv2d_relu`)."""

    def __init__(self, stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...], groups: int, relu: bool = False):
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.relu = groups, relu

    def forward(self, x, w, b):
        k = self.kernels = dispatch.kernels(self.device)
        self.x_shape, self.w_shape = x.shape, w.shape
        self.x = x if self.needs_input_grad[1] else None
        self.w = w if self.needs_input_grad[0] else None
        y = k.conv_bias_relu_forward(x, w, b, self.relu, self.stride, self.padding,
                                     self.dilation, self.groups)
        self.y = y if self.relu and any(self.needs_input_grad) else None
        return y

    def backward(self, gy):
        k, need = self.kernels, self.needs_input_grad
        if self.relu:
            gy = k.relu_backward(gy, self.y)
        args = (self.stride, self.padding, self.dilation, self.groups)
        gx = k.conv_backward_data(gy, self.w, self.x_shape, *args) if need[0] else None
        gw = k.conv_backward_weight(gy, self.x, self.w_shape, *args) if need[1] else None
        gb = k.bias_grad(gy) if need[2] else None
        return gx, gw, gb


def _conv(nd: int, x, weight, bias, stride, padding, dilation, groups,
          relu: bool = False) -> Tensor:
    """conv2d / conv3d; ``relu=True`` applies a ReLU to the output in the same op.
    ``padding`` may be ``'valid'`` (none) or ``'same'`` (stride 1: the output keeps the input's
    size; an odd total padding puts the extra row on the right, by padding the input first, as
    PyTorch does)."""
    op = f"conv{nd}d"
    x = float_tensor(x, op, "input")
    weight = float_tensor(weight, op, "weight", device=x.device)
    bias = None if bias is None else float_tensor(bias, op, "bias", device=x.device)
    x, was_unbatched = batched(x, nd, op)
    if weight.ndim != nd + 2:
        raise ValueError(f"{op}: weight must be {nd + 2}-D (K, C/groups, *kernel), "
                         f"got shape {weight.shape}")
    check_same(op, x, "input", weight=weight, bias=bias)
    stride = ntuple(stride, nd, op, "stride", 1)
    dilation = ntuple(dilation, nd, op, "dilation", 1)
    if isinstance(padding, str):
        if weight.ndim != nd + 2:
            raise ValueError(f"{op}: weight must be {nd + 2}-D (K, C/groups, *kernel), "
                             f"got shape {weight.shape}")
        x, padding = _string_padding(op, x, padding, weight.shape[2:], stride, dilation)
    padding = ntuple(padding, nd, op, "padding", 0)
    if not isinstance(groups, Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    C, K = x.shape[1], weight.shape[0]
    if C % groups or K % groups:
        raise ValueError(f"{op}: groups={groups} must divide both the input channels ({C}) and "
                         f"the output channels ({K})")
    if weight.shape[1] * groups != C:
        raise ValueError(f"{op}: input has {C} channels, but weight of shape {weight.shape} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    if bias is not None and bias.shape != (K,):
        raise ValueError(f"{op}: bias must have shape ({K},), got {bias.shape}")
    spatial, kernel = x.shape[2:], weight.shape[2:]
    for s, k, p, d in zip(spatial, kernel, padding, dilation):
        if d * (k - 1) + 1 > s + 2 * p:
            raise ValueError(f"{op}: kernel {tuple(kernel)} (dilation {dilation}) is larger than "
                             f"the padded input "
                             f"{tuple(s + 2 * p for s, p in zip(spatial, padding))}")
    conv = Conv(stride, padding, dilation, int(groups), bool(relu))
    if x.shape[0] == 0:
        return unbatched(on_empty_batch(lambda one: conv.apply(one, weight, bias), x),
                         was_unbatched)
    return unbatched(conv.apply(x, weight, bias), was_unbatched)


def _string_padding(op: str, x: Tensor, padding: str, kernel, stride, dilation):
    """(input, padding) for ``padding='valid'`` or ``'same'``."""
    if padding == "valid":
        return x, 0
    if padding != "same":
        raise ValueError(f"{op}: padding must be an int, a tuple of ints, 'valid' or 'same', "
                         f"got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"{op}: padding='same' needs stride 1, got stride {stride}")
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    left = tuple(t // 2 for t in totals)
    extra = [t - 2 * lo for t, lo in zip(totals, left)]  # 1 where the total is odd
    if any(extra):
        amounts = []
        for e in reversed(extra):  # F.pad lists the last axis first
            amounts += [0, e]
        x = pad(x, amounts)
    return x, left


def conv2d(x, weight, bias=None, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
           dilation: IntOrTuple = 1, groups: int = 1) -> Tensor:
    """2D convolution. x (N, C, H, W), weight (K, C/groups, KH, KW), bias (K,) -> (N, K, OH, OW)."""
    return _conv(2, x, weight, bias, stride, padding, dilation, groups)


def conv3d(x, weight, bias=None, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
           dilation: IntOrTuple = 1, groups: int = 1) -> Tensor:
    """3D convolution. x (N, C, D, H, W), weight (K, C/groups, KD, KH, KW) -> (N, K, OD, OH, OW)."""
    return _conv(3, x, weight, bias, stride, padding, dilation, groups)


def conv2d_relu(x, weight, bias=None, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                dilation: IntOrTuple = 1, groups: int = 1) -> Tensor:
    """``relu(conv2d(...))`` as one op (one fused kernel on ``cuda``; the same values)."""
    return _conv(2, x, weight, bias, stride, padding, dilation, groups, relu=True)


def conv3d_relu(x, weight, bias=None, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                dilation: IntOrTuple = 1, groups: int = 1) -> Tensor:
    """``relu(conv3d(...))`` as one op."""
    return _conv(3, x, weight, bias, stride, padding, dilation, groups, relu=True)
