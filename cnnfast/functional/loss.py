"""Losses: ``binary_cross_entropy_with_logits`` and ``cross_entropy``."""

from __future__ import annotations

from cnnfast import dispatch
from cnnfast.functional.checks import float_tensor
from cnnfast.tensor import Function, Tensor, as_tensor


def _reduce(xp, loss, reduction: str):
    if reduction == "mean":
        return loss.mean(), 1.0 / loss.size
    if reduction == "sum":
        return loss.sum(), 1.0
    return loss, None


class BCEWithLogits(Function):
    def __init__(self, pos_weight, reduction: str):
        self.pos_weight, self.reduction = pos_weight, reduction

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
    z = float_tensor(input, op, "input")
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
        pw_t = float_tensor(pos_weight, op, "pos_weight", device=z.device)
        if pw_t.ndim > 1 or (pw_t.ndim == 1 and pw_t.shape[0] not in (1, z.shape[-1])):
            raise ValueError(f"{op}: pos_weight must have shape ({z.shape[-1]},) or be a scalar, "
                             f"got {pw_t.shape}")
        pw = pw_t.data.astype(z.dtype, copy=False)
    return BCEWithLogits(pw, reduction).apply(z, Tensor(y_data, device=z.device))


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


def cross_entropy(input, target, reduction: str = "mean") -> Tensor:
    """Log-softmax + negative log-likelihood. input (N, classes) logits, target (N,) class ids."""
    op = "cross_entropy"
    z = float_tensor(input, op, "input")
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
    return CrossEntropy(reduction).apply(z, t)
