"""``cnnfast predict`` (a .npz split, a folder of PNGs, a folder of .npy volumes) and
``cnnfast plot --gradcam``: the CSV holds what ``evaluate`` scores; bad input exits 2."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from cases import randomize_batch_norm

from cnnfast import synthetic
from cnnfast.checkpoint import save_checkpoint
from cnnfast.cli import main
from cnnfast.data import save_npz
from cnnfast.models import SmallCNN
from cnnfast.train import checkpoint_meta, evaluate


def _checkpoint(path, ds, channels=(4, 8)):
    model = SmallCNN(ds.in_channels, ds.num_outputs, ds.spatial_dims, channels=channels, seed=0)
    randomize_batch_norm(model, seed=1)
    return save_checkpoint(path, model.state_dict(), checkpoint_meta(model, ds)), model


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [r[0] for r in rows[1:]], np.array([r[1:] for r in rows[1:]], np.float64)


@pytest.fixture(scope="module")
def nodule2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2d")
    ds = synthetic.nodule_dataset(8, 6, 10, seed=0, size=16)
    ckpt, model = _checkpoint(root / "m.ckpt", ds)
    return root, ds, save_npz(root / "d.npz", ds), ckpt, model


def test_predict_npz_split_matches_evaluate(nodule2d, tmp_path):
    root, ds, npz, ckpt, model = nodule2d
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(npz), "--split", "val",
                 "--out", str(out), "--batch-size", "4"]) == 0
    header, names, probs = _read(out)
    assert header == ["index", "no nodule", "nodule"]
    assert names == [str(i) for i in range(len(ds.val))]
    _, expected = evaluate(model, ds.val, ds.task, ds.label_names, ds.normalization)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_predict_png_folder_with_gradcam(nodule2d, tmp_path, capsys):
    from PIL import Image

    root, ds, npz, ckpt, model = nodule2d
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(ds.test.images):
        Image.fromarray(img[0]).save(folder / f"slice_{i:02d}.png")
    out, heat = tmp_path / "preds.csv", tmp_path / "heat"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(out),
                 "--gradcam", str(heat), "--gradcam-max", "3"]) == 0
    header, names, probs = _read(out)
    assert header[0] == "file" and names == [f"slice_{i:02d}.png" for i in range(10)]
    _, expected = evaluate(model, ds.test, ds.task, ds.label_names, ds.normalization)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)  # PNG is lossless
    assert sorted(p.name for p in heat.iterdir()) == [f"gradcam_slice_{i:02d}.png"
                                                     for i in range(3)]
    assert "warning" not in capsys.readouterr().err
    # RGB JPEGs of another size: converted to grey, resized, with a warning.
    other = tmp_path / "jpgs"
    other.mkdir()
    for i in range(3):
        Image.fromarray(np.repeat(ds.test.images[i, 0, :, :, None], 3, axis=2)).resize(
            (24, 20)).save(other / f"x{i}.jpg")
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(other), "--out",
                 str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "resized" in err and "20x24" in err
    _, names, probs = _read(out)
    assert names == ["x0.jpg", "x1.jpg", "x2.jpg"] and probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_predict_npy_volumes(tmp_path, capsys):
    ds = synthetic.nodule_dataset(6, 4, 5, seed=0, spatial_dims=3, size=8)
    ckpt, model = _checkpoint(tmp_path / "m3.ckpt", ds)
    folder = tmp_path / "vols"
    folder.mkdir()
    for i, vol in enumerate(ds.test.images):
        np.save(folder / f"v{i}.npy", vol[0] if i % 2 else vol)  # (D, H, W) or (C, D, H, W)
    out, heat = tmp_path / "p.csv", tmp_path / "heat3d"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(folder), "--out",
                 str(out), "--gradcam", str(heat), "--gradcam-max", "2"]) == 0
    _, names, probs = _read(out)
    assert names == [f"v{i}.npy" for i in range(5)]
    assert sorted(p.name for p in heat.iterdir()) == ["gradcam_v0.png", "gradcam_v1.png"]
    _, expected = evaluate(model, ds.test, ds.task, ds.label_names, ds.normalization)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    # volumes of another size are resized (trilinear) with a warning
    other = tmp_path / "big"
    other.mkdir()
    np.save(other / "a.npy", np.zeros((10, 12, 9), np.uint8))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(other), "--out",
                 str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "10x12x9" in err and "resized to 8x8x8" in err


def test_predict_bad_input_exits_2(nodule2d, tmp_path, capsys):
    root, ds, npz, ckpt, model = nodule2d
    empty = tmp_path / "empty"
    empty.mkdir()
    vols = tmp_path / "vols"
    vols.mkdir()
    np.save(vols / "a.npy", np.zeros((8, 8, 8), np.uint8))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    out = str(tmp_path / "p.csv")
    for data, message in ((empty, "no PNG/JPEG"), (vols, "3D"), (broken, "cannot read"),
                          (tmp_path / "missing.npz", "missing.npz")):
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(ckpt), "--data", str(data), "--out",
                     out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cnnfast predict: error:") and message in err
        assert err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists()


def test_plot_gradcam(nodule2d, tmp_path, capsys):
    root, ds, npz, ckpt, model = nodule2d
    assert main(["plot", "--checkpoint", str(ckpt), "--data", str(npz), "--out",
                 str(tmp_path), "--gradcam", "4"]) == 0
    assert (tmp_path / "gradcam.png").stat().st_size > 1000
