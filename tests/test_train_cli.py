"""Training loop, evaluation, and the ``cnnfast`` command line (tiny data, tiny models)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from cnnfast import synthetic
from cnnfast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnnfast.cli import main
from cnnfast.data import BINARY, save_npz
from cnnfast.models import SmallCNN
from cnnfast.train import TrainConfig, check_fits, evaluate, fit, model_from_checkpoint


@pytest.fixture(scope="module")
def npz_2d(tmp_path_factory):
    """A tiny multi-label 2D .npz (synthetic chest X-ray, 16 px)."""
    ds = synthetic.chestxray_dataset(48, 16, 16, seed=0, size=16)
    return save_npz(tmp_path_factory.mktemp("data") / "cxr16.npz", ds)


@pytest.fixture(scope="module")
def npz_3d(tmp_path_factory):
    """A tiny binary 3D .npz (synthetic nodule volumes, 8 voxels)."""
    ds = synthetic.nodule_dataset(24, 8, 8, seed=0, spatial_dims=3, size=8)
    return save_npz(tmp_path_factory.mktemp("data") / "nod3d.npz", ds)


# --- fit / evaluate -----------------------------------------------------------------------------

def test_fit_keeps_best_validation_weights_and_is_reproducible(tmp_path):
    ds = synthetic.nodule_dataset(96, 32, 32, seed=0, size=16)
    config = TrainConfig(epochs=3, batch_size=32, lr=3e-3, schedule="cosine", seed=4)
    runs = []
    for i in range(2):
        model = SmallCNN(1, 2, channels=(4, 8), seed=4)
        result = fit(model, ds, config, checkpoint_path=tmp_path / f"{i}.ckpt", progress=False)
        runs.append((model, result))
    (model, result), (_, again) = runs
    assert [r.val_auc for r in result.history] == [r.val_auc for r in again.history]
    assert [r.train_loss for r in result.history] == [r.train_loss for r in again.history]
    assert len(result.history) == 3
    best = max(result.history, key=lambda r: r.val_auc)
    assert result.best_epoch == best.epoch and result.best_val_auc == best.val_auc
    lrs = [r.lr for r in result.history]
    assert lrs[0] == 3e-3 and lrs[1] < lrs[0]  # cosine schedule stepped each epoch
    # the model holds the best epoch's weights, as does the checkpoint
    val, _ = evaluate(model, ds.val, ds.task, ds.label_names, ds.normalization)
    assert val.auc == pytest.approx(result.best_val_auc)
    ckpt = load_checkpoint(tmp_path / "0.ckpt")
    assert ckpt.header["epoch"] == result.best_epoch
    assert ckpt.metrics["val"]["auc"] == pytest.approx(result.best_val_auc)
    restored = model_from_checkpoint(ckpt)
    val2, _ = evaluate(restored, ds.val, ds.task, ds.label_names, ds.normalization)
    assert val2.auc == val.auc


def test_cnn_beats_linear_model_on_synthetic_nodules():
    from cnnfast.cli.train import linear_baseline

    ds = synthetic.nodule_dataset(1000, 200, 500, seed=1)
    model = SmallCNN(1, 2, seed=1)
    fit(model, ds, TrainConfig(epochs=5, batch_size=64, lr=3e-3, schedule="cosine", seed=1),
        progress=False)
    cnn, _ = evaluate(model, ds.test, ds.task, ds.label_names, ds.normalization)
    linear = linear_baseline(ds)
    assert linear < 0.72, linear
    assert cnn.auc > linear + 0.08, (cnn.auc, linear)


def test_train_config_validation():
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainConfig(lr=-1.0)
    assert TrainConfig().resolved_milestones() == [50, 75]  # the MedMNIST recipe
    assert TrainConfig(epochs=3).resolved_milestones() == [1, 2]
    assert TrainConfig(epochs=2).resolved_milestones() == [1]
    assert TrainConfig(epochs=1).resolved_milestones() == []   # not [0, 0]: full lr throughout


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["evaluate"], ["plot"],
                                     ["download"]])
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cnnfast" in out
    if not command:
        for name in ("demo", "train", "evaluate", "plot", "bench"):
            assert name in out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "cnnfast", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "usage: cnnfast" in done.stdout


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text and "test AUROC" in text and "logistic regression" in text
    assert str(out / "roc.png") in text
    for name in ("smallcnn.ckpt", "metrics.json", "filters.png", "feature_maps.png", "roc.png",
                 "training_curves.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    auc = metrics["metrics"]["test"]["auc"]
    assert f"test AUROC {auc:.4f}" in text


def test_train_evaluate_plot_2d(tmp_path, npz_2d, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(npz_2d), "--model", "resnet18", "--width", "2",
                 "--epochs", "2", "--batch-size", "16", "--no-progress", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for finding in synthetic.FINDINGS:
        assert finding in text  # the per-label table
    ckpt = load_checkpoint(out / "resnet18.ckpt")
    assert ckpt.task == "multi-label, binary-class" and ckpt.label_names == list(synthetic.FINDINGS)
    assert ckpt.model_config["kwargs"]["stem"] == "small"
    assert len(ckpt.header["history"]) == 2 and "test" in ckpt.metrics
    test_auc = ckpt.metrics["test"]["auc"]

    assert main(["evaluate", "--checkpoint", str(out / "resnet18.ckpt"), "--data", str(npz_2d),
                 "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert f"AUROC {test_auc:.4f}" in text
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["auc"] == pytest.approx(
        test_auc)

    plots = tmp_path / "plots"
    assert main(["plot", "--checkpoint", str(out / "resnet18.ckpt"), "--data", str(npz_2d),
                 "--out", str(plots)]) == 0
    assert {p.name for p in plots.iterdir()} == {"filters.png", "feature_maps.png", "roc.png",
                                                 "samples.png", "training_curves.png"}


def test_train_3d_smallcnn(tmp_path, npz_3d, capsys):
    out = tmp_path / "run3d"
    code = main(["train", "--data", str(npz_3d), "--model", "smallcnn", "--channels", "2", "4",
                 "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--optimizer", "sgd",
                 "--weight-decay", "1e-4", "--no-progress", "--out", str(out)])
    assert code == 0
    ckpt = load_checkpoint(out / "smallcnn.ckpt")
    assert ckpt.model_config["kwargs"]["spatial_dims"] == 3 and ckpt.task == BINARY
    assert ckpt.header["train_config"]["optimizer"] == "sgd"
    assert "test AUROC" in capsys.readouterr().out


# --- bad input: one line, exit status 2, nothing written ----------------------------------------

def _bad_npz(tmp_path, name, **arrays):
    base = {f"{s}_images": np.zeros((4, 8, 8), np.uint8) for s in ("train", "val", "test")}
    base.update({f"{s}_labels": np.array([[0], [1], [0], [1]]) for s in ("train", "val", "test")})
    base.update(arrays)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


BAD_DATA = {
    "missing file": lambda t: str(t / "absent.npz"),
    "missing keys": lambda t: _bad_npz(t, "k.npz", val_labels=None),
    "length mismatch": lambda t: _bad_npz(t, "n.npz", train_labels=np.zeros((3, 1), int)),
    "bad rank": lambda t: _bad_npz(t, "r.npz", test_images=np.zeros((4, 8), np.uint8)),
    "labels out of range": lambda t: _bad_npz(t, "breastmnist.npz",
                                              val_labels=np.array([[0], [1], [5], [1]])),
    "unknown name": lambda t: "notamnist",
}
BAD_MESSAGES = {
    "missing file": "data file not found", "missing keys": "missing key(s) val_labels",
    "length mismatch": "train_images has 4 images but train_labels has 3 labels",
    "bad rank": "got rank 2", "labels out of range": "label 5 out of range",
    "unknown name": "unknown dataset 'notamnist'",
}


def _assert_usage_error(capsys, code, message):
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "error:" in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_train_bad_data(tmp_path, capsys, case):
    out = tmp_path / "out"
    code = main(["train", "--data", BAD_DATA[case](tmp_path), "--epochs", "1", "--out", str(out),
                 "--data-root", str(tmp_path / "root"), "--no-progress"])
    _assert_usage_error(capsys, code, BAD_MESSAGES[case])
    assert not out.exists()


def test_offline_download_writes_nothing(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port with nothing listening: refused, as when offline
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    root, out = tmp_path / "data" / "medmnist", tmp_path / "out"
    code = main(["train", "--data", "pneumoniamnist", "--data-root", str(root), "--base-url",
                 dead, "--out", str(out), "--no-progress"])
    _assert_usage_error(capsys, code, "could not download pneumoniamnist.npz")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_bad_data(tmp_path, capsys, npz_3d):
    model = SmallCNN(1, 2, 3, channels=(2,), seed=0)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model.state_dict(), {"model": model.config,
                                                                     "task": BINARY})
    code = main(["evaluate", "--checkpoint", str(ckpt), "--data", BAD_DATA["length mismatch"](
        tmp_path)])
    _assert_usage_error(capsys, code, BAD_MESSAGES["length mismatch"])


def test_checkpoint_for_another_architecture(tmp_path, capsys, npz_2d, npz_3d):
    model = SmallCNN(1, 2, 3, channels=(2,), seed=0)  # a 3D binary model...
    ckpt = save_checkpoint(tmp_path / "m3d.ckpt", model.state_dict(),
                           {"model": model.config, "task": BINARY})
    plots = tmp_path / "plots"
    code = main(["plot", "--checkpoint", str(ckpt), "--data", str(npz_2d), "--out", str(plots)])
    _assert_usage_error(capsys, code, "it is a 3D smallcnn but the data is 2D")  # ...on 2D data
    assert not plots.exists()
    code = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(npz_2d)])
    _assert_usage_error(capsys, code, "6 labels")
    # header and weights disagree: the weights are refused, not half-loaded
    lying = save_checkpoint(tmp_path / "lying.ckpt", model.state_dict(),
                            {"model": {"name": "resnet18", "kwargs": {
                                "in_channels": 1, "num_classes": 2, "spatial_dims": 3,
                                "width": 2}}, "task": BINARY})
    code = main(["evaluate", "--checkpoint", str(lying), "--data", str(npz_3d)])
    _assert_usage_error(capsys, code, "weights of a 'resnet18' model do not fit")
    with pytest.raises(CheckpointError):
        check_fits(load_checkpoint(ckpt), synthetic.chestxray_dataset(2, 2, 2, size=16))


def test_damaged_checkpoint(tmp_path, capsys, npz_3d):
    model = SmallCNN(1, 2, 3, channels=(2,), seed=0)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model.state_dict(), {"model": model.config,
                                                                     "task": BINARY})
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[:-40])
    code = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(npz_3d)])
    _assert_usage_error(capsys, code, "truncated")
    ckpt.write_bytes(raw[:-50] + bytes([raw[-50] ^ 1]) + raw[-49:])
    code = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(npz_3d)])
    _assert_usage_error(capsys, code, "corrupted")
    code = main(["evaluate", "--checkpoint", str(tmp_path / "none.ckpt"), "--data", str(npz_3d)])
    _assert_usage_error(capsys, code, "checkpoint not found")


def test_cuda_without_gpu(tmp_path, capsys, npz_2d, monkeypatch):
    from cnnfast import backend

    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    out = tmp_path / "out"
    for argv in (["train", "--data", str(npz_2d), "--out", str(out)],
                 ["demo", "--quick", "--out", str(out)]):
        code = main(argv + ["--device", "cuda"])
        _assert_usage_error(capsys, code, "device 'cuda' is not available")
        assert not out.exists()


def test_bad_numbers_are_usage_errors(capsys, npz_2d):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(npz_2d), "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


# --- bench forwarding ---------------------------------------------------------------------------

def test_bench_forwards_arguments(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("cnnfast.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "cnnfast.bench", fake)
    import cnnfast

    monkeypatch.setattr(cnnfast, "bench", fake, raising=False)
    assert main(["bench", "--quick", "--help"]) == 0
    assert calls == [["--quick", "--help"]]


def test_bench_missing_is_a_clear_error(monkeypatch, capsys):
    import cnnfast

    monkeypatch.setitem(sys.modules, "cnnfast.bench", None)  # import of cnnfast.bench fails
    monkeypatch.delattr(cnnfast, "bench", raising=False)
    code = main(["bench", "--quick"])
    _assert_usage_error(capsys, code, "cnnfast.bench")


def test_bench_arguments_are_forwarded(capsys):
    code = main(["bench", "--paths", "tpu"])
    _assert_usage_error(capsys, code, "tpu")
