"""Losses: ``binary_cross_entropy_with_logits`` and ``cross_entropy``."""

from __future__ import annotations

import numpy as np

from cnnfast import dispatch
from cnnfast.autograd import unbroadcast
from cnnfast.functional.activation import log_softmax
from cnnfast.functional.checks import float_tensor
from cnnfast.tensor import Function, Tensor, as_tensor


def _reduce(xp, loss, reduction: str):
    if reduction == "mean":
        return loss.mean(), 1.0 / loss.size
    if reduction == "sum":
        return loss.sum(), 1.0
    return loss, None


class BCEWithLogits(Function):
    """Inputs logits z and targets y; ``pos_weight`` and ``weight`` are arrays (or None) that
    broadcast against z. Both z and a float y get gradients."""

    def __init__(self, pos_weight, weight, reduction: str):
        self.pos_weight, self.weight, self.reduction = pos_weight, weight, reduction

    def forward(self, z, y):
        xp = dispatch.array_xp(z)
        pw = self.pos_weight
        # log(1 + exp(-|z|)) + max(-z, 0) = softplus(-z), stable for any |z|
        softplus_neg = xp.log1p(xp.exp(-xp.abs(z))) + xp.maximum(-z, 0)
        log_weight = 1 + (pw - 1) * y if pw is not None else 1
        loss = (1 - y) * z + log_weight * softplus_neg
        if self.weight is not None:
            loss = loss * self.weight
        self.z, self.y, self.log_weight = z, y, log_weight
        self.softplus_neg = softplus_neg if self.needs_input_grad[1] else None
        out, self.scale = _reduce(xp, loss, self.reduction)
        return out.astype(z.dtype, copy=False)

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        upstream = gy * self.scale if self.scale is not None else gy
        if self.weight is not None:
            upstream = upstream * self.weight
        gz = gt = None
        if self.needs_input_grad[0]:
            sig_neg = 0.5 * (1 - xp.tanh(0.5 * self.z))  # sigmoid(-z)
            gz = ((1 - self.y) - self.log_weight * sig_neg) * upstream
            gz = unbroadcast(gz, self.z.shape).astype(self.z.dtype, copy=False)
        if self.needs_input_grad[1]:
            dy = -self.z
            if self.pos_weight is not None:
                dy = dy + (self.pos_weight - 1) * self.softplus_neg
            gt = unbroadcast(dy * upstream, self.y.shape).astype(self.z.dtype, copy=False)
        return gz, gt


_REDUCTIONS = ("mean", "sum", "none")


def _broadcastable(op: str, name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if np.broadcast_shapes(t.shape, shape) != tuple(shape):
        raise ValueError(f"{op}: {name} of shape {t.shape} must broadcast to the input's shape "
                         f"{tuple(shape)}")


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction: str = "mean",
                                     pos_weight=None) -> Tensor:
    """Sigmoid + binary cross-entropy in one stable step (binary and multilabel), PyTorch's
    arguments: input and target of one shape; ``weight`` (broadcast to the input) scales each
    element's loss; ``pos_weight`` (broadcast, usually (L,)) weighs the positive term per label.
    A float target that requires grad gets its gradient too. ``size_average``/``reduce``
    (deprecated in PyTorch) are refused."""
    op = "binary_cross_entropy_with_logits"
    if size_average is not None or reduce is not None:
        raise ValueError(f"{op}: size_average and reduce are deprecated; use reduction=")
    z = float_tensor(input, op, "input")
    y = as_tensor(target, device=z.device, name=f"{op}: target")
    if y.shape != z.shape:
        raise ValueError(f"{op}: target shape {y.shape} must match input shape {z.shape}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if y.device != z.device:
        raise ValueError(f"{op}: target is on {y.device!r} but input is on {z.device!r}")
    if y.dtype != z.dtype:
        y = Tensor(y.data.astype(z.dtype), device=z.device)
    arrays = {}
    for name, value in (("pos_weight", pos_weight), ("weight", weight)):
        arrays[name] = None
        if value is not None:
            t = float_tensor(value, op, name, device=z.device)
            _broadcastable(op, name, t, z.shape)
            arrays[name] = t.data.astype(z.dtype, copy=False)
    return BCEWithLogits(arrays["pos_weight"], arrays["weight"], reduction).apply(z, y)


class CrossEntropy(Function):
    def __init__(self, reduction: str):
        self.reduction = reduction

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


def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100,
                  reduce=None, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Log-softmax + negative log-likelihood, PyTorch's arguments. input (N, C) or
    (N, C, d1, ...) logits (or (C,) for one sample); target class indices (N,) / (N, d1, ...),
    or class probabilities of the input's shape. ``weight`` (C,) weighs each class (the mean
    divides by the targets' total weight); targets equal to ``ignore_index`` count nothing;
    ``label_smoothing`` mixes the target with the uniform distribution. The plain case (2-D,
    index targets, no options) runs as one op; the others are composed from autograd ops (so
    probability targets get their gradient too)."""
    op = "cross_entropy"
    if size_average is not None or reduce is not None:
        raise ValueError(f"{op}: size_average and reduce are deprecated; use reduction=")
    z = float_tensor(input, op, "input")
    t = as_tensor(target, device=z.device, name=f"{op}: target")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if z.ndim < 1:
        raise ValueError(f"{op}: input must be (C,), (N, C) or (N, C, d1, ...), got shape "
                         f"{z.shape}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    C = z.shape[0] if z.ndim == 1 else z.shape[1]
    w = None
    if weight is not None:
        w = float_tensor(weight, op, "weight", device=z.device)
        if w.shape != (C,):
            raise ValueError(f"{op}: weight must have shape ({C},) for {C} classes, "
                             f"got {w.shape}")
        w = w.data.astype(z.dtype, copy=False)
    probabilities = t.dtype.kind == "f" and t.shape == z.shape
    if not probabilities:
        index_shape = () if z.ndim == 1 else (z.shape[0],) + z.shape[2:]
        if t.dtype.kind not in "iu":
            raise TypeError(f"{op}: target must hold integer class indices of shape "
                            f"{index_shape} or class probabilities of shape {z.shape}, got "
                            f"dtype {t.dtype} and shape {t.shape}")
        if t.shape != index_shape:
            raise ValueError(f"{op}: target must have shape {index_shape} of class indices, "
                             f"got {t.shape}")
        kept = t.data[t.data != ignore_index]
        if kept.size and (int(kept.min()) < 0 or int(kept.max()) >= C):
            raise ValueError(f"{op}: target class indices must lie in [0, {C - 1}] (or be "
                             f"ignore_index={ignore_index}), got values from {int(kept.min())} "
                             f"to {int(kept.max())}")
        if (z.ndim == 2 and w is None and label_smoothing == 0.0
                and kept.size == t.size and z.shape[0] > 0):
            return CrossEntropy(reduction).apply(z, t)
    one_sample = z.ndim == 1
    if one_sample:
        z, t = z.reshape(1, C), t.reshape((1,) + t.shape[1:] if probabilities else (1,))
    # classes last, one row per (sample, position)
    rows = z.permute(0, *range(2, z.ndim), 1).reshape(-1, C)
    log_p = log_softmax(rows, 1)
    per_row_shape = (z.shape[0],) + z.shape[2:]
    if probabilities:
        q = t.permute(0, *range(2, t.ndim), 1).reshape(-1, C).to(dtype=z.dtype)
        if label_smoothing:
            q = q * (1 - label_smoothing) + label_smoothing / C
        terms = log_p * q if w is None else log_p * q * w
        loss = -terms.sum(1)
        if reduction == "none":
            return loss.reshape(() if one_sample else per_row_shape)
        return loss.sum() if reduction == "sum" else loss.sum() * (1.0 / max(loss.shape[0], 1))
    xp = z.xp
    index = t.data.reshape(-1)
    keep = index != ignore_index
    safe = xp.where(keep, index, 0)
    class_weight = xp.ones(C, dtype=z.dtype) if w is None else w
    row_weight = xp.where(keep, class_weight[safe], 0).astype(z.dtype)
    picked = log_p[xp.arange(index.shape[0]), safe]
    loss = -(picked * row_weight) * (1 - label_smoothing)
    if label_smoothing:
        smooth = -(log_p * class_weight).sum(1) * keep.astype(z.dtype)
        loss = loss + smooth * (label_smoothing / C)
    if reduction == "none":
        return loss.reshape(() if one_sample else per_row_shape)
    if reduction == "sum":
        return loss.sum()
    total = float(row_weight.sum())
    if total == 0:  # every target ignored: NaN, with the zero gradient PyTorch gives
        return loss.sum() + float("nan")
    return loss.sum() / total

