"""AUROC and accuracy as MedMNIST's evaluator computes them (``medmnist.Evaluator``), through
scikit-learn.

Scores are ``(N, K)`` per-class probabilities (softmax of the logits; binary tasks have ``K = 2``)
or ``(N, L)`` per-label probabilities (sigmoid; multi-label); labels are ``(N, L)`` or ``(N,)``.

* binary: AUROC of the positive class's score ``scores[:, -1]``; accuracy of
  ``scores[:, -1] > 0.5``.
* multi-label: the mean over labels of each label's AUROC; accuracy is the mean over labels of
  the per-label accuracy of ``scores >= 0.5``. The per-label values are kept for a table.
* multi-class (and ordinal regression): the mean over classes of one-vs-rest AUROCs; accuracy of
  the arg-max class.

One deviation from MedMNIST: a label (or class) that has only one value in ``y_true`` has no
AUROC; MedMNIST's evaluator raises there, here it is ``nan`` in the table, left out of the mean,
and named in :attr:`Metrics.undefined`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from cnnfast.dataset import BINARY, MULTICLASS, MULTILABEL, ORDINAL, TASKS


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits, computed stably in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    """Model logits ``(N, K)`` -> probabilities: sigmoid for multi-label, softmax otherwise."""
    return sigmoid(logits) if task == MULTILABEL else softmax(logits)


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Binary AUROC (``sklearn.metrics.roc_auc_score``); ``nan`` when ``y_true`` has one class."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).ravel()
    if len(np.unique(y_true)) < 2:
        return math.nan
    return float(roc_auc_score(y_true, np.asarray(y_score, np.float64).ravel()))


@dataclass
class LabelMetrics:
    """One label's (or one class's, one-vs-rest) numbers."""

    name: str
    auc: float
    acc: float
    positives: int
    count: int


@dataclass
class Metrics:
    """MedMNIST's two numbers (``auc``, ``acc``) plus a per-label table."""

    task: str
    auc: float
    acc: float
    per_label: list[LabelMetrics] = field(default_factory=list)
    undefined: list[str] = field(default_factory=list)
    count: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        # JSON has no NaN: undefined AUROCs become null
        for row in d["per_label"]:
            row["auc"] = None if math.isnan(row["auc"]) else row["auc"]
        d["auc"] = None if math.isnan(d["auc"]) else d["auc"]
        return d

    def table(self) -> str:
        """A fixed-width text table: one row per label/class, then the mean."""
        width = max([len("label")] + [len(r.name) for r in self.per_label])
        width = min(width, 40)
        lines = [f"{'label':<{width}}  {'AUROC':>6}  {'acc':>6}  {'positives':>11}"]
        for r in self.per_label:
            auc = "   n/a" if math.isnan(r.auc) else f"{r.auc:6.4f}"
            lines.append(f"{r.name[:width]:<{width}}  {auc}  {r.acc:6.4f}  "
                         f"{r.positives:>5}/{r.count:<5}")
        if self.task != BINARY:  # a binary task's one row is the overall result already
            auc = "   n/a" if math.isnan(self.auc) else f"{self.auc:6.4f}"
            lines.append(f"{'mean':<{width}}  {auc}  {self.acc:6.4f}")
        return "\n".join(lines)


def _as_2d(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{what}: expected shape (N,) or (N, L), got {a.shape}")
    return a


def evaluate_scores(y_true: np.ndarray, y_score: np.ndarray, task: str,
                    label_names: Sequence[str] | None = None, threshold: float = 0.5) -> Metrics:
    """MedMNIST's AUROC and accuracy for ``task`` from labels and probabilities (see module doc).

    ``y_true`` ``(N, L)`` or ``(N,)`` integers; ``y_score`` ``(N, K)`` probabilities (a binary
    task also accepts ``(N,)`` positive-class scores).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    y_true = _as_2d(y_true, "y_true").astype(np.int64)
    y_score = _as_2d(y_score, "y_score").astype(np.float64)
    n = len(y_true)
    if len(y_score) != n:
        raise ValueError(f"y_true has {n} rows but y_score has {len(y_score)}")
    if n == 0:
        raise ValueError("cannot evaluate on zero samples")

    rows: list[LabelMetrics] = []
    if task == MULTILABEL:
        if y_true.shape[1] != y_score.shape[1]:
            raise ValueError(f"multi-label y_true {y_true.shape} and y_score {y_score.shape} "
                             "must have the same number of labels")
        names = _names(label_names, y_true.shape[1])
        predicted = y_score >= threshold  # MedMNIST: score < threshold -> 0, else 1
        for j, name in enumerate(names):
            rows.append(LabelMetrics(name, auroc(y_true[:, j], y_score[:, j]),
                                     float(np.mean(predicted[:, j] == y_true[:, j])),
                                     int(y_true[:, j].sum()), n))
        acc = float(np.mean([r.acc for r in rows]))
    elif task == BINARY:
        if y_true.shape[1] != 1:
            raise ValueError(f"binary y_true must be (N,) or (N, 1), got {y_true.shape}")
        truth = y_true[:, 0]
        positive = y_score[:, -1]
        predicted = positive > threshold
        acc = float(np.mean(predicted == truth))
        names = _names(label_names, 2)
        rows.append(LabelMetrics(names[-1], auroc(truth, positive), acc, int(truth.sum()), n))
    else:  # multi-class and ordinal regression: one-vs-rest, as MedMNIST
        if y_true.shape[1] != 1:
            raise ValueError(f"{task} y_true must be (N,) or (N, 1), got {y_true.shape}")
        truth = y_true[:, 0]
        k = y_score.shape[1]
        if truth.max() >= k or truth.min() < 0:
            raise ValueError(f"labels must lie in 0..{k - 1} for scores with {k} classes")
        names = _names(label_names, k)
        predicted = y_score.argmax(axis=1)
        acc = float(np.mean(predicted == truth))
        for j, name in enumerate(names):
            is_j = (truth == j).astype(np.int64)
            rows.append(LabelMetrics(name, auroc(is_j, y_score[:, j]),
                                     float(np.mean((predicted == j) == is_j.astype(bool))),
                                     int(is_j.sum()), n))
    defined = [r.auc for r in rows if not math.isnan(r.auc)]
    mean_auc = float(np.mean(defined)) if defined else math.nan
    return Metrics(task=task, auc=mean_auc, acc=acc, per_label=rows,
                   undefined=[r.name for r in rows if math.isnan(r.auc)], count=n)


def _names(label_names: Sequence[str] | None, k: int) -> list[str]:
    if label_names is None:
        return [str(i) for i in range(k)]
    if len(label_names) != k:
        raise ValueError(f"got {len(label_names)} label names for {k} scores")
    return [str(n) for n in label_names]


def roc_curves(y_true: np.ndarray, y_score: np.ndarray, task: str,
               label_names: Sequence[str] | None = None
               ) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(name, fpr, tpr, auc)`` per curve: one for binary (positive class), one per label
    (multi-label), one per class one-vs-rest (multi-class). Labels with one class are skipped."""
    from sklearn.metrics import roc_curve

    y_true = _as_2d(y_true, "y_true").astype(np.int64)
    y_score = _as_2d(y_score, "y_score").astype(np.float64)
    if task == BINARY:
        names = _names(label_names, 2)
        pairs = [(names[-1], y_true[:, 0], y_score[:, -1])]
    elif task == MULTILABEL:
        names = _names(label_names, y_true.shape[1])
        pairs = [(names[j], y_true[:, j], y_score[:, j]) for j in range(y_true.shape[1])]
    elif task in (MULTICLASS, ORDINAL):
        names = _names(label_names, y_score.shape[1])
        pairs = [(names[j], (y_true[:, 0] == j).astype(np.int64), y_score[:, j])
                 for j in range(y_score.shape[1])]
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    curves = []
    for name, truth, score in pairs:
        if len(np.unique(truth)) < 2:
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        curves.append((name, fpr, tpr, auroc(truth, score)))
    return curves
