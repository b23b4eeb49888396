"""Data checks at load (cnnfast.datacheck): pixels, empty splits, dtypes, labels that must fit the
task; the real MedMNIST files in ../shared/data load, train and evaluate."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from cnnfast.cli import main
from cnnfast.data import BINARY, MULTICLASS, ORDINAL, DataError, load_npz
from cnnfast.models import SmallCNN
from cnnfast.train import TrainConfig, evaluate, fit


def _arrays(labels=None, n=(6, 4, 4), shape=(8, 8), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, (split, count) in enumerate(zip(("train", "val", "test"), n)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape)).astype(dtype)
        arrays[f"{split}_labels"] = (np.asarray(labels[i]).reshape(-1, 1) if labels is not None
                                     else (np.arange(count) % 2).reshape(-1, 1))
    return arrays


def _write(tmp_path, name, arrays) -> Path:
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


# --- pixels, splits, dtypes ---------------------------------------------------------------------

def test_non_finite_pixels_name_split_and_index(tmp_path):
    arrays = _arrays(dtype=np.float32)
    arrays["train_images"][3, 2, 5] = np.nan
    arrays["train_images"][5, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"train_images\[3\] has NaN pixel values \(2 image\(s\) "
                                        r"of the train split do\)"):
        load_npz(_write(tmp_path, "a.npz", arrays))
    arrays = _arrays(dtype=np.float64)
    arrays["test_images"][2, 7, 7] = -np.inf
    with pytest.raises(DataError, match=r"test_images\[2\] has infinite pixel values"):
        load_npz(_write(tmp_path, "b.npz", arrays))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(val_images=a["val_images"][:0], val_labels=a["val_labels"][:0]),
     "the val split is empty"),
    (lambda a: a.update(train_images=a["train_images"].astype(np.float16)), "dtype float16"),
    (lambda a: a.update(test_images=a["test_images"].astype(np.complex64)), "dtype complex64"),
    (lambda a: a.update(train_images=a["train_images"] > 0), "dtype bool"),
    (lambda a: a.update(test_images=np.zeros((4, 9, 8), np.uint8)), "image shapes differ"),
    (lambda a: a.update(val_labels=np.zeros((4, 2), np.int64)), "different numbers of columns"),
    (lambda a: a.update(train_labels=np.array(["a"] * 6)), "N x L numbers"),
    (lambda a: a.update(test_labels=np.int64(3)), "N x L numbers"),
])
def test_bad_splits_and_dtypes(tmp_path, mutate, message):
    arrays = _arrays()
    mutate(arrays)
    with pytest.raises(DataError, match=re.escape(message)):
        load_npz(_write(tmp_path, "bad.npz", arrays))


# --- labels must fit the task ---------------------------------------------------------------------

def test_binary_file_with_a_stray_label_is_refused_listing_the_values(tmp_path):
    labels = ([0, 1, 0, 1, 7, 0], [0, 1, 0, 1], [0, 1, 1, 0])
    path = _write(tmp_path, "mine.npz", _arrays(labels))
    with pytest.raises(DataError, match=r"the labels hold the values 0, 1, 7 \(train: 0, 1, 7\)"
                                        r".*classes 2, 3, 4, 5, 6 never occur in train.*"
                                        r"--num-classes"):
        load_npz(path)
    # said explicitly: an 8-class problem with classes absent from train
    ds = load_npz(path, num_classes=8)
    assert ds.task == MULTICLASS and ds.num_outputs == 8
    # a MedMNIST name fixes the task: binary, labels 0..1
    named = _write(tmp_path, "breastmnist.npz", _arrays(labels))
    with pytest.raises(DataError, match=r"label 7 out of range: binary-class labels must lie in "
                                        r"0\.\.1 \(values found: 0, 1, 7\)"):
        load_npz(named)
    with pytest.raises(DataError, match="--num-classes 8 but the dataset names 2 classes"):
        load_npz(named, num_classes=8)


def test_multiclass_needs_every_class_in_train_or_num_classes(tmp_path):
    ok = load_npz(_write(tmp_path, "a.npz", _arrays(([0, 1, 2, 3, 1, 2], [0, 3, 3, 1],
                                                     [2, 2, 1, 0]))))
    assert ok.task == MULTICLASS and ok.label_names == ["0", "1", "2", "3"]
    missing = _write(tmp_path, "b.npz", _arrays(([0, 1, 3, 3, 1, 0], [0, 2, 3, 1], [3, 0, 1, 0])))
    with pytest.raises(DataError, match=r"values 0, 1, 2, 3 \(train: 0, 1, 3\).*classes 2 never"):
        load_npz(missing)
    assert load_npz(missing, num_classes=4).num_outputs == 4
    with pytest.raises(DataError, match=r"label 3 out of range: multi-class labels must lie in "
                                        r"0\.\.2 \(values found: 0, 1, 3\)"):
        load_npz(missing, num_classes=3)
    assert load_npz(_write(tmp_path, "c.npz", _arrays())).task == BINARY
    with pytest.raises(DataError, match="one label column"):
        arrays = _arrays()
        for s in ("train", "val", "test"):
            arrays[f"{s}_labels"] = np.zeros((len(arrays[f"{s}_images"]), 3), np.int64)
        load_npz(_write(tmp_path, "d.npz", arrays), num_classes=3)


def test_cli_data_errors_are_one_line_exit_2(tmp_path, capsys):
    arrays = _arrays(([0, 1, 0, 1, 7, 0], [0, 1, 0, 1], [0, 1, 1, 0]))
    code = main(["train", "--data", str(_write(tmp_path, "seven.npz", arrays)), "--epochs", "1",
                 "--out", str(tmp_path / "o1"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "values 0, 1, 7" in err[0], err
    arrays = _arrays(dtype=np.float32)
    arrays["val_images"][1, 0, 0] = np.inf
    code = main(["train", "--data", str(_write(tmp_path, "inf.npz", arrays)), "--epochs", "1",
                 "--out", str(tmp_path / "o2"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "val_images[1] has infinite pixel values" in err[0]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # said explicitly, the same file trains as 8 classes
    out = tmp_path / "o3"
    assert main(["train", "--data", str(tmp_path / "seven.npz"), "--num-classes", "8",
                 "--model", "smallcnn", "--channels", "2", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    from cnnfast.checkpoint import load_checkpoint

    assert load_checkpoint(out / "smallcnn.ckpt").model_config["kwargs"]["num_classes"] == 8


# --- the real MedMNIST files ---------------------------------------------------------------

def _shared_data() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    for candidate in (root.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return None


DATA = _shared_data()
REAL = {  # name -> (task, classes, channels, spatial shape)
    "breastmnist": (BINARY, 2, 1, (28, 28)),
    "retinamnist": (ORDINAL, 5, 3, (28, 28)),
    "vesselmnist3d": (BINARY, 2, 1, (28, 28, 28)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_medmnist_files_load_train_and_evaluate(name):
    path = DATA / f"{name}.npz" if DATA is not None else None
    if path is None or not path.is_file():
        pytest.skip(f"{name}.npz not in ../shared/data")
    ds = load_npz(path)
    task, classes, channels, shape = REAL[name]
    assert (ds.task, ds.num_outputs, ds.in_channels, ds.image_shape) == (task, classes, channels,
                                                                         shape)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    for split in ("train", "val", "test"):
        labels = ds.split(split).labels
        assert len(labels) > 0 and labels.min() >= 0 and labels.max() < classes
    # a few steps on a slice of train (every class kept), then the whole test split
    keep = np.concatenate([np.flatnonzero(ds.train.labels[:, 0] == k)[:12]
                           for k in range(classes)])
    ds.train.images, ds.train.labels = ds.train.images[keep], ds.train.labels[keep]
    model = SmallCNN(channels, classes, len(shape), channels=(4, 8), seed=0)
    result = fit(model, ds, TrainConfig(epochs=1, batch_size=16, lr=3e-3, seed=0),
                 progress=False)
    assert np.isfinite(result.history[0].train_loss)
    metrics, scores = evaluate(model, ds.test, ds.task, ds.label_names, ds.normalization)
    assert scores.shape == (len(ds.test), classes) and 0.0 <= metrics.auc <= 1.0


def test_real_file_through_the_cli(tmp_path, capsys):
    path = DATA / "breastmnist.npz" if DATA is not None else None
    if path is None or not path.is_file():
        pytest.skip("breastmnist.npz not in ../shared/data")
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--model", "smallcnn", "--channels", "4", "8",
                 "--epochs", "1", "--batch-size", "128", "--no-progress", "--out", str(out)]) == 0
    assert main(["evaluate", "--checkpoint", str(out / "smallcnn.ckpt"), "--data", str(path)]) == 0
    text = capsys.readouterr().out
    assert "breastmnist test split (156 images, binary-class)" in text, text
    assert os.path.isfile(out / "training.state")
