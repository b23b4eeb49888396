"""ONNX export: every model cnnfast builds passes onnx.checker and matches onnxruntime to 1e-5
(eval mode, random batch-norm statistics, normalisation and softmax/sigmoid inside the graph)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cnnfast
from cnnfast import nn
from cnnfast.data import Normalization
from cnnfast.models import SmallCNN, resnet18

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cases import randomize_batch_norm  # noqa: E402

CASES = {  # name -> (model factory, input (C, *S), task)
    "smallcnn-2d": (lambda: SmallCNN(1, 2, 2, seed=0), (1, 28, 28), "binary-class"),
    "smallcnn-2d-rgb-multilabel": (lambda: SmallCNN(3, 6, 2, seed=1), (3, 20, 20),
                                   "multi-label, binary-class"),
    "smallcnn-3d": (lambda: SmallCNN(1, 2, 3, channels=(4, 8), seed=2), (1, 12, 12, 12),
                    "binary-class"),
    "resnet18-2d-small": (lambda: resnet18(1, 3, 2, stem="small", width=8, seed=3),
                          (1, 28, 28), "multi-class"),
    "resnet18-2d-imagenet": (lambda: resnet18(3, 2, 2, stem="imagenet", width=8, seed=4),
                             (3, 64, 64), "binary-class"),
    "resnet18-3d-small": (lambda: resnet18(1, 2, 3, stem="small", width=4, seed=5),
                          (1, 16, 16, 16), "binary-class"),
    "resnet18-3d-imagenet": (lambda: resnet18(1, 2, 3, stem="imagenet", width=4, seed=6),
                             (1, 32, 32, 32), "binary-class"),
}


def _cnnfast_probabilities(model, images, norm, task):
    from cnnfast.metrics import scores_from_logits
    from cnnfast.train import predict_logits

    return scores_from_logits(predict_logits(model, images, norm), task)


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_onnxruntime(name, tmp_path, rng):
    factory, input_shape, task = CASES[name]
    model = factory()
    randomize_batch_norm(model, seed=7)
    norm = Normalization.medmnist(len(input_shape) - 1)
    labels = [f"class {i}" for i in range(model.config["kwargs"]["num_classes"])]
    path = cnnfast.export_onnx(model, tmp_path / "m.onnx", input_shape, normalization=norm,
                               task=task, label_names=labels)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["label_names"]) == labels
    assert meta["cnnfast_version"] == cnnfast.__version__
    assert json.loads(meta["normalization"]) == norm.to_dict()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch axis is dynamic
        images = rng.integers(0, 256, (batch,) + input_shape).astype(np.uint8)
        got = session.run(None, {"images": images.astype(np.float32)})[0]
        expected = _cnnfast_probabilities(model, images, norm, task)
        diff = float(np.abs(got - expected).max())
        print(f"{name}: batch {batch} max |onnxruntime - cnnfast| = {diff:.2e}")
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The logits themselves (not squashed by the softmax) agree too.
    path = cnnfast.export_onnx(model, tmp_path / "logits.onnx", input_shape, normalization=norm,
                               output="logits")
    images = rng.integers(0, 256, (2,) + input_shape).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": images})[0]
    from cnnfast.train import predict_logits

    expected = predict_logits(model, images, norm)
    print(f"{name}: logits max |onnxruntime - cnnfast| = {np.abs(got - expected).max():.2e} "
          f"(logits up to {np.abs(expected).max():.1f})")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_export_handles_pool_arguments(tmp_path, rng):
    """Layers with ceil_mode / count_include_pad / divisor_override / dilation, and constant
    padding, export exactly."""
    model = nn.Sequential(
        nn.ConstantPad((1, 0, 2, 1), 0.5), nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.AvgPool2d(2, stride=1, divisor_override=3),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    path = cnnfast.export_onnx(model, tmp_path / "p.onnx", (2, 23, 19), output="logits")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 2, 23, 19)).astype(np.float32)
    with cnnfast.no_grad():
        expected = model.eval()(cnnfast.tensor(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"images": x})[0], expected, rtol=1e-5,
                               atol=1e-5)


def test_export_refuses_bad_arguments(tmp_path):
    from cnnfast.export import ExportError

    model = SmallCNN(1, 2, 2, seed=0)
    with pytest.raises(ExportError, match="input_shape"):
        cnnfast.export_onnx(model, tmp_path / "m.onnx", (1, 28, 28, 28))
    with pytest.raises(ExportError, match="opset"):
        cnnfast.export_onnx(model, tmp_path / "m.onnx", (1, 28, 28), opset=11)
    with pytest.raises(ExportError, match="label_names"):
        cnnfast.export_onnx(model, tmp_path / "m.onnx", (1, 28, 28), label_names=["a"])
    with pytest.raises(ExportError, match="cannot export"):
        cnnfast.export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3), _Odd()), tmp_path / "m.onnx",
                            (1, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


class _Odd(nn.Module):
    def forward(self, x):
        return x


def test_cli_export_checkpoint_matches_evaluate(tmp_path, capsys):
    from cnnfast import synthetic
    from cnnfast.checkpoint import save_checkpoint
    from cnnfast.cli import main
    from cnnfast.train import checkpoint_meta, evaluate

    ds = synthetic.chestxray_dataset(8, 8, 12, seed=0, size=16)  # multi-label: sigmoid output
    model = SmallCNN(1, 6, 2, channels=(4, 8), seed=0)
    randomize_batch_norm(model, seed=1)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model.state_dict(), checkpoint_meta(model, ds))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": ds.test.images.astype(np.float32)})[0]
    _, expected = evaluate(model, ds.test, ds.task, ds.label_names, ds.normalization)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["label_names"]) == ds.label_names
    assert meta["task"] == ds.task
    # bad input: one line, exit status 2
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--out",
                 str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnfast export: error:") and err.count("\n") == 1
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 2
