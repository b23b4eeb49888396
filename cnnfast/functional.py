"""The public ops, PyTorch-shaped: validate the arguments, then run an autograd ``Function``.

Every public function checks its inputs first and raises ``ValueError``/``TypeError`` naming the
argument, what it got and what was expected — before any kernel runs. The ``Function`` classes
below call the kernels of the tensor's device through :func:`cnnfast.dispatch.kernels` (the path
is fixed at forward time and reused in backward). Each accepts a ``Tensor`` or a NumPy/CuPy
array.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np

from cnnfast import dispatch, rng
from cnnfast.shapes import output_size
from cnnfast.tensor import FLOAT_DTYPES, Function, Tensor, as_tensor

IntOrTuple = int | Sequence[int]

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "avg_pool2d",
    "avg_pool3d",
    "batch_norm",
    "binary_cross_entropy_with_logits",
    "conv2d",
    "conv3d",
    "cross_entropy",
    "dropout",
    "linear",
    "log_softmax",
    "max_pool2d",
    "max_pool3d",
    "pad",
    "relu",
    "sigmoid",
    "softmax",
]

_SPATIAL = {2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


# --- argument checks ----------------------------------------------------------------------------

def _float_tensor(x, op: str, name: str, device: str | None = None) -> Tensor:
    t = as_tensor(x, device=device, name=f"{op}: {name}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {t.dtype}")
    return t


def _same(op: str, reference: Tensor, ref_name: str, **others: Tensor | None) -> None:
    """All tensors share ``reference``'s device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"{op}: {name} is on device {t.device!r} but {ref_name} is on "
                             f"{reference.device!r}; move them to one device with .to()")
        if t.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has "
                            f"{reference.dtype}; use one dtype")


def _ntuple(value, nd: int, op: str, name: str, minimum: int) -> tuple[int, ...]:
    """An int or a length-``nd`` sequence of ints, each >= ``minimum``, as a tuple."""
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


def _check_rank(x: Tensor, nd: int, op: str, name: str = "input") -> None:
    if x.ndim != nd + 2:
        raise ValueError(f"{op}: {name} must be {nd + 2}-D {_SPATIAL[nd]}, got shape {x.shape}")


# --- convolution ----------------------------------------------------------------------------------

class Conv(Function):
    """Convolution (cross-correlation) with optional bias, any spatial rank the kernels accept."""

    relu = False  # fused ReLU on the output (nn's conv followed by ReLU; see _conv)

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
    """conv2d / conv3d; ``relu=True`` applies a ReLU to the output in the same op (what
    ``nn.Sequential`` asks for when a convolution is followed by ``nn.ReLU``)."""
    op = f"conv{nd}d"
    x = _float_tensor(x, op, "input")
    weight = _float_tensor(weight, op, "weight", device=x.device)
    bias = None if bias is None else _float_tensor(bias, op, "bias", device=x.device)
    _check_rank(x, nd, op)
    if weight.ndim != nd + 2:
        raise ValueError(f"{op}: weight must be {nd + 2}-D (K, C/groups, *kernel), "
                         f"got shape {weight.shape}")
    _same(op, x, "input", weight=weight, bias=bias)
    stride = _ntuple(stride, nd, op, "stride", 1)
    padding = _ntuple(padding, nd, op, "padding", 0)
    dilation = _ntuple(dilation, nd, op, "dilation", 1)
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
    if x.shape[0] == 0:
        raise ValueError(f"{op}: input has an empty batch (shape {x.shape})")
    return Conv.apply(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                      groups=int(groups), relu=bool(relu))


def conv2d(x, weight, bias=None, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
           dilation: IntOrTuple = 1, groups: int = 1) -> Tensor:
    """2D convolution. x (N, C, H, W), weight (K, C/groups, KH, KW), bias (K,) -> (N, K, OH, OW)."""
    return _conv(2, x, weight, bias, stride, padding, dilation, groups)


def conv3d(x, weight, bias=None, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
           dilation: IntOrTuple = 1, groups: int = 1) -> Tensor:
    """3D convolution. x (N, C, D, H, W), weight (K, C/groups, KD, KH, KW) -> (N, K, OD, OH, OW)."""
    return _conv(3, x, weight, bias, stride, padding, dilation, groups)


# --- pooling --------------------------------------------------------------------------------------

class MaxPool(Function):
    def forward(self, x):
        k = self.kernels = dispatch.kernels(self.device)
        self.x_shape = x.shape
        y, self.idx = k.max_pool_forward(x, self.kernel, self.stride, self.padding, self.dilation,
                                         self.ceil_mode)
        if self.indices is not None:
            self.indices.append(self.idx)
        return y

    def backward(self, gy):
        return self.kernels.max_pool_backward(gy, self.idx, self.x_shape)


class AvgPool(Function):
    def forward(self, x):
        k = self.kernels = dispatch.kernels(self.device)
        self.x_shape = x.shape
        return k.avg_pool_forward(x, self.kernel, self.stride, self.padding, *self.options)

    def backward(self, gy):
        return self.kernels.avg_pool_backward(gy, self.x_shape, self.kernel, self.stride,
                                              self.padding, *self.options)


def _int_arg(value, op: str, name: str) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be an int, got {value!r}")
    return int(value)


def _pool_geometry(nd: int, op: str, x, kernel_size, stride, padding, dilation, ceil_mode):
    """Checked (x, kernel, stride, padding, dilation, ceil_mode) of a pooling call, with
    PyTorch's rules: positive kernel, stride and dilation, padding at most half the kernel, and
    at least one output along every axis."""
    x = _float_tensor(x, op, "input")
    _check_rank(x, nd, op)
    kernel = _ntuple(kernel_size, nd, op, "kernel_size", 1)
    stride = kernel if stride is None else _ntuple(stride, nd, op, "stride", 1)
    padding = _ntuple(padding, nd, op, "padding", 0)
    dilation = _ntuple(dilation, nd, op, "dilation", 1)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"{op}: ceil_mode must be a bool, got {ceil_mode!r}")
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{op}: padding {padding} must be at most half of kernel_size {kernel}")
    out = output_size(x.shape[2:], kernel, stride, padding, dilation, bool(ceil_mode))
    if min(out) < 1:
        raise ValueError(f"{op}: kernel_size {kernel} (dilation {dilation}) is larger than the "
                         f"padded input {tuple(s + 2 * p for s, p in zip(x.shape[2:], padding))}"
                         f": output size {out} is too small")
    return x, kernel, stride, padding, dilation, bool(ceil_mode)


def _max_pool(nd: int, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    op = f"max_pool{nd}d"
    x, kernel, stride, padding, dilation, ceil_mode = _pool_geometry(
        nd, op, x, kernel_size, stride, padding, dilation, ceil_mode)
    indices: list | None = [] if return_indices else None
    y = MaxPool.apply(x, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                      ceil_mode=ceil_mode, indices=indices)
    if return_indices:
        return y, Tensor(indices[0], device=x.device)
    return y


def _avg_pool(nd: int, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override) -> Tensor:
    op = f"avg_pool{nd}d"
    x, kernel, stride, padding, _, ceil_mode = _pool_geometry(
        nd, op, x, kernel_size, stride, padding, 1, ceil_mode)
    if not isinstance(count_include_pad, (bool, np.bool_)):
        raise TypeError(f"{op}: count_include_pad must be a bool, got {count_include_pad!r}")
    if divisor_override is not None:
        divisor_override = _int_arg(divisor_override, op, "divisor_override")
        if divisor_override == 0:
            raise ValueError(f"{op}: divisor_override must not be zero")
    return AvgPool.apply(x, kernel=kernel, stride=stride, padding=padding,
                         options=(ceil_mode, bool(count_include_pad), divisor_override))


def max_pool2d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, dilation: IntOrTuple = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Max pooling over (H, W), PyTorch's arguments: x (N, C, H, W) -> (N, C, OH, OW).

    ``stride`` defaults to ``kernel_size``; padding never wins; ``dilation`` spaces the taps;
    ``ceil_mode`` rounds the output size up (the last window may hang over the end, but starts
    inside the input or its left padding). With ``return_indices`` returns ``(y, indices)``:
    int64, the flat index within each (H, W) plane of the chosen input, like PyTorch's.
    """
    return _max_pool(2, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, dilation: IntOrTuple = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Max pooling over (D, H, W); arguments as :func:`max_pool2d`."""
    return _max_pool(3, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def avg_pool2d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """Average pooling over (H, W), PyTorch's arguments: x (N, C, H, W) -> (N, C, OH, OW).

    The divisor counts the window's positions inside the input and its padding
    (``count_include_pad``, the default), or inside the input only, or is ``divisor_override``.
    """
    return _avg_pool(2, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def avg_pool3d(x, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
               padding: IntOrTuple = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """Average pooling over (D, H, W); arguments as :func:`avg_pool2d`."""
    return _avg_pool(3, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


# --- padding ----------------------------------------------------------------------------------

class Pad(Function):
    """Constant padding (negative amounts crop); backward crops the gradient back."""

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
    x = _float_tensor(x, op, "input")
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
    return Pad.apply(x, out_shape=tuple(out_shape), inner=tuple(inner), source=tuple(source),
                     value=float(value))


class AdaptiveAvgPool(Function):
    def forward(self, x):
        self.kernels = dispatch.kernels(self.device)
        self.x_shape = x.shape
        return self.kernels.adaptive_avg_pool_forward(x, self.output_size)

    def backward(self, gy):
        return self.kernels.adaptive_avg_pool_backward(gy, self.x_shape)


def _adaptive(nd: int, x, output_size) -> Tensor:
    op = f"adaptive_avg_pool{nd}d"
    x = _float_tensor(x, op, "input")
    _check_rank(x, nd, op)
    size = _ntuple(output_size, nd, op, "output_size", 1)
    return AdaptiveAvgPool.apply(x, output_size=size)


def adaptive_avg_pool2d(x, output_size: IntOrTuple) -> Tensor:
    """Average over PyTorch's adaptive bins to (N, C, *output_size); 1 is global pooling."""
    return _adaptive(2, x, output_size)


def adaptive_avg_pool3d(x, output_size: IntOrTuple) -> Tensor:
    return _adaptive(3, x, output_size)


# --- activations, linear, dropout ----------------------------------------------------------------

class ReLU(Function):
    def forward(self, x):
        self.kernels = dispatch.kernels(self.device)
        self.y = self.kernels.relu_forward(x)
        return self.y

    def backward(self, gy):
        return self.kernels.relu_backward(gy, self.y)


def relu(x) -> Tensor:
    """max(x, 0) elementwise; the gradient at 0 is 0 (like PyTorch)."""
    return ReLU.apply(_float_tensor(x, "relu", "input"))


def sigmoid(x) -> Tensor:
    return _float_tensor(x, "sigmoid", "input").sigmoid()


def log_softmax(x, dim: int = -1) -> Tensor:
    """Numerically stable log-softmax along ``dim``."""
    x = _float_tensor(x, "log_softmax", "input")
    shift = x.xp.max(x.data, axis=dim, keepdims=True)  # a constant: the result is independent
    z = x - Tensor(shift, device=x.device)
    return z - z.exp().sum(axis=dim, keepdims=True).log()


def softmax(x, dim: int = -1) -> Tensor:
    return log_softmax(x, dim).exp()


class Linear(Function):
    def forward(self, x, w, b):
        self.kernels = dispatch.kernels(self.device)
        self.x = x if self.needs_input_grad[1] else None
        self.w = w if self.needs_input_grad[0] else None
        return self.kernels.linear_forward(x, w, b)

    def backward(self, gy):
        need = self.needs_input_grad
        return self.kernels.linear_backward(gy, self.x, self.w, need_x=need[0], need_w=need[1],
                                            need_b=need[2])


def linear(x, weight, bias=None) -> Tensor:
    """x (N, IN) @ weight (OUT, IN).T + bias (OUT,) -> (N, OUT)."""
    x = _float_tensor(x, "linear", "input")
    weight = _float_tensor(weight, "linear", "weight", device=x.device)
    bias = None if bias is None else _float_tensor(bias, "linear", "bias", device=x.device)
    _same("linear", x, "input", weight=weight, bias=bias)
    if x.ndim != 2:
        raise ValueError(f"linear: input must be 2-D (N, IN), got shape {x.shape}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"linear: weight must have shape (OUT, {x.shape[1]}), got {weight.shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    return Linear.apply(x, weight, bias)


class Dropout(Function):
    def forward(self, x):
        return x * self.mask

    def backward(self, gy):
        return gy * self.mask


def dropout(x, p: float = 0.5, training: bool = True,
            rng_: np.random.Generator | int | None = None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) (training only).

    The mask comes from ``rng_`` (a Generator or seed) or the global generator of
    :func:`cnnfast.manual_seed`, so a seed fixes it.
    """
    x = _float_tensor(x, "dropout", "input")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p!r}")
    if not training or p == 0.0:
        return x
    kernels = dispatch.kernels(x.device)
    mask = kernels.dropout_mask(x.xp, x.shape, float(p), rng.resolve(rng_), x.dtype)
    return Dropout.apply(x, mask=mask)


# --- batch norm -----------------------------------------------------------------------------------

class BatchNormTrain(Function):
    """Batch statistics; updates the running buffers in place when they are given."""

    relu = False  # fused ReLU on the output (nn's batch norm followed by ReLU)

    def forward(self, x, gamma, beta):
        k = self.kernels = dispatch.kernels(self.device)
        forward = k.batch_norm_relu_forward_train if self.relu else k.batch_norm_forward_train
        y, mean, invstd = forward(x, gamma, beta, self.eps)
        if self.running_mean is not None:
            n = x.size // x.shape[1]
            var = 1.0 / (invstd * invstd) - self.eps
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * var * (n / max(n - 1, 1))
        if any(self.needs_input_grad):
            self.x, self.gamma, self.mean, self.invstd = x, gamma, mean, invstd
            self.y = y if self.relu else None
        return y

    def backward(self, gy):
        k = self.kernels
        if self.relu:
            gx, ggamma, gbeta = k.batch_norm_relu_backward(gy, self.x, self.y, self.gamma,
                                                           self.mean, self.invstd)
        else:
            gx, ggamma, gbeta = k.batch_norm_backward(gy, self.x, self.gamma, self.mean,
                                                      self.invstd)
        need = self.needs_input_grad
        return (gx if need[0] else None, ggamma if need[1] else None, gbeta if need[2] else None)


class BatchNormEval(Function):
    """Running statistics: an affine map per channel."""

    relu = False  # fused ReLU on the output

    def forward(self, x, gamma, beta):
        k = self.kernels = dispatch.kernels(self.device)
        self.nd = x.ndim - 2
        if self.needs_input_grad[1]:
            self.x = x
        self.gamma = gamma
        forward = k.batch_norm_relu_forward_eval if self.relu else k.batch_norm_forward_eval
        y = forward(x, gamma, beta, self.running_mean, self.running_var, self.eps)
        self.y = y if self.relu and any(self.needs_input_grad) else None
        return y

    def backward(self, gy):
        if self.relu:
            gy = self.kernels.relu_backward(gy, self.y)
        xp = dispatch.array_xp(gy)
        shape = (1, -1) + (1,) * self.nd
        axes = (0,) + tuple(range(2, gy.ndim))
        invstd = 1.0 / xp.sqrt(self.running_var + self.eps)
        need = self.needs_input_grad
        gx = gy * (self.gamma * invstd).reshape(shape) if need[0] else None
        ggamma = None
        if need[1]:
            xhat = (self.x - self.running_mean.reshape(shape)) * invstd.reshape(shape)
            ggamma = (gy * xhat).sum(axis=axes)
        gbeta = gy.sum(axis=axes) if need[2] else None
        return gx, ggamma, gbeta


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch norm over (N, *spatial) per channel; see :func:`_batch_norm`."""
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5, relu: bool = False) -> Tensor:
    """Batch norm over (N, *spatial) per channel, x (N, C, H, W) or (N, C, D, H, W).

    Training uses the batch's statistics (biased variance) and, when the running buffers are
    given, updates them in place: ``r = (1 - momentum) * r + momentum * batch`` with the
    unbiased variance. Evaluation uses the running statistics. ``relu=True`` applies a ReLU to
    the output in the same op (what ``nn.Sequential`` asks for when ``nn.ReLU`` follows).
    """
    op = "batch_norm"
    x = _float_tensor(x, op, "input")
    if x.ndim not in (4, 5):
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W) or 5-D (N, C, D, H, W), "
                         f"got shape {x.shape}")
    C = x.shape[1]
    xp = x.xp
    gamma = (_float_tensor(weight, op, "weight", device=x.device) if weight is not None
             else Tensor(xp.ones(C, dtype=x.dtype), device=x.device))
    beta = (_float_tensor(bias, op, "bias", device=x.device) if bias is not None
            else Tensor(xp.zeros(C, dtype=x.dtype), device=x.device))
    stats = {}
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        stats[name] = None if buf is None else _float_tensor(buf, op, name, device=x.device)
    _same(op, x, "input", weight=gamma, bias=beta, **stats)
    for name, t in (("weight", gamma), ("bias", beta), *stats.items()):
        if t is not None and t.shape != (C,):
            raise ValueError(f"{op}: {name} must have shape ({C},) for {C} channels, got {t.shape}")
    rm = None if stats["running_mean"] is None else stats["running_mean"].data
    rv = None if stats["running_var"] is None else stats["running_var"].data
    if (rm is None) != (rv is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if training:
        if x.size // C <= 1:
            raise ValueError(f"{op}: training needs more than one value per channel, got input "
                             f"shape {x.shape}")
        return BatchNormTrain.apply(x, gamma, beta, running_mean=rm, running_var=rv,
                                    momentum=float(momentum), eps=float(eps), relu=bool(relu))
    if rm is None:
        raise ValueError(f"{op}: evaluation mode (training=False) needs running_mean and "
                         f"running_var")
    return BatchNormEval.apply(x, gamma, beta, running_mean=rm, running_var=rv, eps=float(eps),
                               relu=bool(relu))


# --- losses ---------------------------------------------------------------------------------------

def _reduce(xp, loss, reduction: str):
    if reduction == "mean":
        return loss.mean(), 1.0 / loss.size
    if reduction == "sum":
        return loss.sum(), 1.0
    return loss, None


class BCEWithLogits(Function):
    def forward(self, z, y):
        xp = dispatch.array_xp(z)
        pw = self.pos_weight
        # log(1 + exp(-|z|)) + max(-z, 0) = softplus(-z), stable for any |z|
        softplus_neg = xp.log1p(xp.exp(-xp.abs(z))) + xp.maximum(-z, 0)
        log_weight = 1 + (pw - 1) * y if pw is not None else 1
        loss = (1 - y) * z + log_weight * softplus_neg
        self.z, self.y, self.log_weight = z, y, log_weight
        out, self.scale = _reduce(xp, loss, self.reduction)
        return out.astype(z.dtype, copy=False)

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        sig_neg = 0.5 * (1 - xp.tanh(0.5 * self.z))  # sigmoid(-z)
        g = (1 - self.y) - self.log_weight * sig_neg
        g = g * (gy * self.scale if self.scale is not None else gy)
        return g.astype(self.z.dtype, copy=False), None


_REDUCTIONS = ("mean", "sum", "none")


def binary_cross_entropy_with_logits(input, target, pos_weight=None,
                                     reduction: str = "mean") -> Tensor:
    """Sigmoid + binary cross-entropy in one stable step (binary and multilabel).

    input and target (N, L) or (N,); ``pos_weight`` (L,) weighs the positive term per label.
    """
    op = "binary_cross_entropy_with_logits"
    z = _float_tensor(input, op, "input")
    y = as_tensor(target, device=z.device, name=f"{op}: target")
    if y.shape != z.shape:
        raise ValueError(f"{op}: target shape {y.shape} must match input shape {z.shape}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if y.device != z.device:
        raise ValueError(f"{op}: target is on {y.device!r} but input is on {z.device!r}")
    y_data = y.data.astype(z.dtype, copy=False)
    pw = None
    if pos_weight is not None:
        pw_t = _float_tensor(pos_weight, op, "pos_weight", device=z.device)
        if pw_t.ndim > 1 or (pw_t.ndim == 1 and pw_t.shape[0] not in (1, z.shape[-1])):
            raise ValueError(f"{op}: pos_weight must have shape ({z.shape[-1]},) or be a scalar, "
                             f"got {pw_t.shape}")
        pw = pw_t.data.astype(z.dtype, copy=False)
    return BCEWithLogits.apply(z, Tensor(y_data, device=z.device), pos_weight=pw,
                               reduction=reduction)


class CrossEntropy(Function):
    def forward(self, z, target):
        xp = dispatch.array_xp(z)
        shifted = z - z.max(axis=1, keepdims=True)
        log_sum = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_sum
        rows = xp.arange(z.shape[0])
        loss = -log_p[rows, target]
        self.target, self.log_p = target, log_p
        out, self.scale = _reduce(xp, loss, self.reduction)
        return out.astype(z.dtype, copy=False)

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        g = xp.exp(self.log_p)
        g[xp.arange(g.shape[0]), self.target] -= 1
        scale = gy * self.scale if self.scale is not None else gy[:, None]
        return g * scale, None


def cross_entropy(input, target, reduction: str = "mean") -> Tensor:
    """Log-softmax + negative log-likelihood. input (N, classes) logits, target (N,) class ids."""
    op = "cross_entropy"
    z = _float_tensor(input, op, "input")
    t = as_tensor(target, device=z.device, name=f"{op}: target")
    if z.ndim != 2:
        raise ValueError(f"{op}: input must be 2-D (N, classes), got shape {z.shape}")
    if t.shape != (z.shape[0],):
        raise ValueError(f"{op}: target must have shape ({z.shape[0]},) of class indices, "
                         f"got {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"{op}: target must hold integer class indices, got dtype {t.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    lo, hi = int(t.data.min()), int(t.data.max())
    if lo < 0 or hi >= z.shape[1]:
        raise ValueError(f"{op}: target class indices must lie in [0, {z.shape[1] - 1}], "
                         f"got values from {lo} to {hi}")
    return CrossEntropy.apply(z, t, reduction=reduction)
