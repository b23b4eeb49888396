"""Plots: each writes a PNG headlessly; matplotlib is imported only when drawing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cnnfast
from cnnfast import synthetic, viz
from cnnfast.metrics import roc_curves
from cnnfast.models import SmallCNN, resnet18

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_import_does_not_load_matplotlib():
    code = ("import sys, cnnfast, cnnfast.viz, cnnfast.cli, cnnfast.train, cnnfast.data; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("shape", [(8, 1, 3, 3), (6, 3, 5, 5), (4, 1, 3, 3, 3), (12, 2, 7, 7)])
def test_plot_filters(tmp_path, shape):
    weight = np.random.default_rng(0).normal(size=shape)
    assert _is_png(viz.plot_filters(weight, tmp_path / "f.png"))


def test_plot_feature_maps_2d_and_3d(tmp_path):
    model2 = SmallCNN(channels=(4, 8), seed=0)
    x2 = np.random.default_rng(0).normal(size=(1, 1, 12, 12)).astype(np.float32)
    maps = model2.feature_maps(cnnfast.tensor(x2))
    assert _is_png(viz.plot_feature_maps(maps, x2[0], tmp_path / "m2.png", max_channels=4))
    model3 = resnet18(1, 2, spatial_dims=3, width=2, seed=0).eval()  # batch 1: running stats
    x3 = np.random.default_rng(0).normal(size=(1, 1, 6, 6, 6)).astype(np.float32)
    maps = model3.feature_maps(cnnfast.tensor(x3))
    assert _is_png(viz.plot_feature_maps(maps, x3[0], tmp_path / "m3.png"))


def test_plot_roc_and_training_curves(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3))
    s = np.clip(y * 0.3 + rng.random((50, 3)) * 0.7, 0, 1)
    curves = roc_curves(y, s, "multi-label, binary-class", ["a", "b", "c"])
    assert _is_png(viz.plot_roc(curves, tmp_path / "roc.png"))
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_auc": 0.5 + 0.04 * e,
                "val_acc": 0.5 + 0.03 * e} for e in range(1, 6)]
    assert _is_png(viz.plot_training_curves(history, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="history is empty"):
        viz.plot_training_curves([], tmp_path / "none.png")


def test_plot_all(tmp_path):
    ds = synthetic.chestxray_dataset(8, 4, 12, seed=0, size=16)
    model = SmallCNN(1, 6, channels=(4, 8), seed=0)
    scores = np.random.default_rng(0).random((12, 6))
    paths = viz.plot_all(model, ds, scores, None, tmp_path)
    assert set(paths) == {"filters", "feature_maps", "roc", "samples"}
    assert all(_is_png(p) for p in paths.values())
