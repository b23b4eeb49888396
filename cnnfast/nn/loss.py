"""Loss modules, PyTorch's arguments."""

from __future__ import annotations

from cnnfast import functional as F
from cnnfast.nn.module import Module
from cnnfast.tensor import Tensor


def _no_legacy(name: str, size_average, reduce) -> None:
    if size_average is not None or reduce is not None:
        raise ValueError(f"{name}: size_average and reduce are deprecated; use reduction=")


class BCEWithLogitsLoss(Module):
    """Sigmoid + binary cross-entropy, stable for any logit; binary and multilabel targets.

    ``weight`` scales each element's loss (broadcast to the input); ``pos_weight`` (L,) weighs
    positives per label, e.g. (#negatives / #positives). Both are buffers.
    """

    def __init__(self, weight=None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight=None):
        super().__init__()
        _no_legacy("BCEWithLogitsLoss", size_average, reduce)
        self.reduction = reduction
        self.register_buffer("weight", None if weight is None else Tensor(weight))
        self.register_buffer("pos_weight", None if pos_weight is None else Tensor(pos_weight))

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  reduction=self.reduction,
                                                  pos_weight=self.pos_weight)


class CrossEntropyLoss(Module):
    """Log-softmax + negative log-likelihood over class logits (N, C, ...), targets class
    indices or probabilities; arguments as :func:`cnnfast.functional.cross_entropy`."""

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        _no_legacy("CrossEntropyLoss", size_average, reduce)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", None if weight is None else Tensor(weight))

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)
