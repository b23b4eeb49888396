"""Loss modules."""

from __future__ import annotations

from cnnfast import functional as F
from cnnfast.nn.module import Module
from cnnfast.tensor import Tensor


class BCEWithLogitsLoss(Module):
    """Sigmoid + binary cross-entropy, stable for any logit; binary and multilabel targets.

    ``pos_weight`` (L,) weighs positives per label, e.g. (#negatives / #positives).
    """

    def __init__(self, pos_weight=None, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction
        self.register_buffer("pos_weight", None if pos_weight is None else Tensor(pos_weight))

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.pos_weight, self.reduction)


class CrossEntropyLoss(Module):
    """Log-softmax + negative log-likelihood over class logits (N, classes), targets (N,)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.reduction)
