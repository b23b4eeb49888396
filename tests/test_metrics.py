"""Metrics: MedMNIST's AUROC/accuracy on hand-made cases, against hand-computed values and
scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cnnfast.data import BINARY, MULTICLASS, MULTILABEL
from cnnfast.metrics import auroc, evaluate_scores, roc_curves, scores_from_logits, sigmoid, softmax


def test_auroc_hand_computed():
    # pairs (positive, negative): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, 0.1) ok, (0.8, 0.4) ok
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(3 / 4)
    # a tie between a positive and a negative counts one half: (0.5 vs 0.5) + 1 + 1 + 1 = 3.5 / 4
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(3.5 / 4)
    assert auroc([1, 1, 0, 0, 0], [0.9, 0.8, 0.3, 0.2, 0.1]) == 1.0
    assert auroc([1, 1, 0, 0, 0], [0.1, 0.2, 0.3, 0.8, 0.9]) == 0.0
    assert math.isnan(auroc([1, 1, 1], [0.2, 0.4, 0.6]))  # one class: undefined


def test_binary_uses_positive_class_score():
    y = np.array([[0], [1], [1], [0], [1]])
    scores = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    m = evaluate_scores(y, scores, BINARY, ["benign", "malignant"])
    # positive scores 0.1 .7 .4 .55 .8 ; positives {.7,.4,.8} vs negatives {.1,.55}: 5 of 6 pairs
    assert m.auc == pytest.approx(5 / 6)
    assert m.auc == pytest.approx(roc_auc_score(y[:, 0], scores[:, 1]))
    # accuracy of score > 0.5: predictions 0 1 0 1 1 vs truth 0 1 1 0 1 -> 3/5
    assert m.acc == pytest.approx(3 / 5)
    assert [r.name for r in m.per_label] == ["malignant"] and m.per_label[0].positives == 3
    # a (N,) positive score works too, and 0.5 exactly is negative (MedMNIST: score > 0.5)
    m1 = evaluate_scores(y[:, 0], np.array([0.1, 0.7, 0.4, 0.5, 0.8]), BINARY)
    assert m1.acc == pytest.approx(4 / 5)


def test_multilabel_mean_of_per_label_aucs():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    s = np.array([[0.8, 0.2, 0.5], [0.3, 0.6, 0.4], [0.6, 0.4, 0.7], [0.2, 0.5, 0.3]])
    m = evaluate_scores(y, s, MULTILABEL, ["a", "b", "c"])
    per_label = [roc_auc_score(y[:, j], s[:, j]) for j in range(3)]
    assert [r.auc for r in m.per_label] == pytest.approx(per_label)
    assert per_label == pytest.approx([1.0, 0.75, 0.5])  # hand-checked pair counts
    assert m.auc == pytest.approx(np.mean(per_label))
    # MedMNIST predicts score >= 0.5 as positive: label c gets 0.5 -> 1 (wrong in row 0)
    acc = [np.mean((s[:, j] >= 0.5) == y[:, j]) for j in range(3)]
    assert m.acc == pytest.approx(np.mean(acc))
    assert m.per_label[2].acc == pytest.approx(0.5)
    table = m.table()
    assert "a" in table and "mean" in table and f"{m.auc:.4f}" in table


def test_multiclass_one_vs_rest_mean_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    y[:4] = [0, 1, 2, 3]
    scores = softmax(rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[y])
    m = evaluate_scores(y[:, None], scores, MULTICLASS)
    assert m.auc == pytest.approx(roc_auc_score(y, scores, multi_class="ovr", average="macro"))
    assert m.acc == pytest.approx(np.mean(scores.argmax(1) == y))
    assert len(m.per_label) == 4


def test_undefined_label_is_reported_not_averaged():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.1], [0.2, 0.3], [0.7, 0.2]])
    m = evaluate_scores(y, s, MULTILABEL, ["present", "absent"])
    assert m.undefined == ["absent"] and math.isnan(m.per_label[1].auc)
    assert m.auc == 1.0
    assert m.to_dict()["per_label"][1]["auc"] is None
    assert "n/a" in m.table()


def test_bad_inputs():
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate_scores([0, 1], [0.1, 0.9], "regression")
    with pytest.raises(ValueError, match="rows"):
        evaluate_scores([0, 1, 1], [[0.1, 0.9]], BINARY)
    with pytest.raises(ValueError, match="same number of labels"):
        evaluate_scores(np.zeros((2, 3)), np.zeros((2, 2)), MULTILABEL)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        evaluate_scores([[0], [2]], [[0.5, 0.5], [0.5, 0.5]], MULTICLASS)


def test_scores_from_logits():
    logits = np.array([[0.0, np.log(3.0)], [1000.0, -1000.0]])
    np.testing.assert_allclose(scores_from_logits(logits, BINARY), [[0.25, 0.75], [1.0, 0.0]])
    np.testing.assert_allclose(scores_from_logits(logits, MULTILABEL), sigmoid(logits))
    np.testing.assert_allclose(sigmoid(np.array([0.0, 800.0, -800.0])), [0.5, 1.0, 0.0])


def test_roc_curves_one_per_label():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6], [0.3, 0.1]])
    curves = roc_curves(y, s, MULTILABEL, ["x", "y"])
    assert [c[0] for c in curves] == ["x", "y"]
    name, fpr, tpr, auc = curves[0]
    assert fpr[0] == 0 and tpr[-1] == 1 and auc == 1.0
    binary = roc_curves(np.array([0, 1, 1]), np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]),
                        BINARY, ["neg", "pos"])
    assert len(binary) == 1 and binary[0][0] == "pos"
