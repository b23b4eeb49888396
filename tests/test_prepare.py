"""cnnfast.prepare: a folder of DICOM series, NIfTI files or DICOM images plus labels.csv -> a
MedMNIST-layout .npz and its manifest; and predict on the same scans with a checkpoint that
records the recipe (the scores must equal those on the prepared .npz rows)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

import medical_files as mf  # noqa: E402

from cnnfast import scans  # noqa: E402
from cnnfast.data import MULTICLASS, MULTILABEL, load_npz  # noqa: E402
from cnnfast.dataset import BINARY, DataError  # noqa: E402
from cnnfast.prepare import prepare  # noqa: E402
from cnnfast.transforms import Preprocessing  # noqa: E402

SHAPE, SPACING = (14, 12, 6), (1.5, 1.7, 3.0)
RECIPE = Preprocessing(size=(6, 10, 10), spacing=(3.0, 2.0, 2.0), window="mediastinum")


def make_volume(positive: bool, seed: int):
    """-1000 HU air, a 40 HU ball (positives only): mediastinum-windowed 0 and 0.5."""
    rng = np.random.default_rng(seed)
    origin = rng.uniform(-50, 50, 3)
    center = origin + np.array(SHAPE) * SPACING / 2 + rng.uniform(-2, 2, 3)
    hu = mf.sphere(SHAPE, SPACING, origin, center, 6.0 if positive else 0.0, inside=40)
    return hu, origin


def write_scans(folder, n_patients=6, per_patient=2, extra_columns=None):
    """Half the scans DICOM series (axial or sagittal), half NIfTI in other orientations."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, k = [], 0
    for p in range(n_patients):
        for j in range(per_patient):
            positive = (p + j) % 2 == 0
            hu, origin = make_volume(positive, seed=k)
            if k % 2 == 0:
                name = f"series{k:02d}"
                view = mf.AXIAL if k % 4 == 0 else mf.SAGITTAL
                mf.write_series(folder / name, hu, SPACING, origin, view,
                                rng=np.random.default_rng(k))
            else:
                name = f"vol{k:02d}.nii.gz"
                mf.write_nifti(folder / name, hu, SPACING, origin, (1, 0, 2), (True, False, True))
            rows.append({"id": name, "patient": f"P{p}", "nodule": int(positive),
                         **(extra_columns(k) if extra_columns else {})})
            k += 1
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_prepare_writes_splits_by_patient_and_a_manifest(tmp_path):
    rows = write_scans(tmp_path / "scans")
    result = prepare(tmp_path / "scans", tmp_path / "out" / "nodules.npz", RECIPE, seed=3,
                     val=0.2, test=0.2)
    ds = load_npz(result.npz)
    assert ds.task == BINARY and ds.label_names == ["nodule=0", "nodule=1"]
    assert ds.image_shape == (6, 10, 10) and ds.train.images.dtype == np.float32
    assert ds.preprocessing == RECIPE.to_dict()
    manifest = json.loads(result.manifest.read_text())
    assert manifest["preprocessing"] == RECIPE.to_dict() and len(manifest["items"]) == len(rows)
    splits_of = {}
    for item in manifest["items"]:
        splits_of.setdefault(item["patient"], set()).add(item["split"])
    assert all(len(s) == 1 for s in splits_of.values())  # no patient in two splits
    assert {s for v in splits_of.values() for s in v} == {"train", "val", "test"}
    assert sum(manifest["counts"].values()) == len(rows)
    # each row: windowed 40 HU is 0.5 where the ball is, air 0: positives reach 0.5
    for split in ("train", "val", "test"):
        items = [i for i in manifest["items"] if i["split"] == split]
        part = ds.split(split)
        for item, image, label in zip(items, part.images, part.labels):
            assert label[0] == item["labels"][0]
            assert image.min() == 0.0
            assert image.max() == pytest.approx(0.5 if label[0] else 0.0, abs=1e-6)
    kinds = {i["kind"] for i in manifest["items"]}
    assert kinds == {"dicom-series", "nifti"}
    # as stored: axial DICOM (columns left, rows posterior), sagittal DICOM, the NIfTI files
    assert {i["axcodes"] for i in manifest["items"]} == {"LPS", "PIR", "PRI"}


def test_prepared_images_are_the_recipe_on_each_scan(tmp_path):
    write_scans(tmp_path / "scans", n_patients=3, per_patient=1)
    result = prepare(tmp_path / "scans", tmp_path / "d.npz", RECIPE, val=0.34, test=0.34)
    manifest = json.loads(result.manifest.read_text())
    ds = load_npz(result.npz)
    for split in ("train", "val", "test"):
        items = [i for i in manifest["items"] if i["split"] == split]
        for item, image in zip(items, ds.split(split).images[:, 0]):
            scan = scans.read_scan(tmp_path / "scans" / item["source"])
            np.testing.assert_array_equal(image, RECIPE.apply(scan.array, scan.spacing))


def test_fixed_splits_multilabel_and_class_names(tmp_path):
    def extra(k):
        return {"split": ["train", "val", "test"][k % 3] if k < 6 else "",
                "effusion": k % 2, "grade": ["low", "high", "mid"][k % 3]}

    write_scans(tmp_path / "scans", n_patients=9, per_patient=1, extra_columns=extra)
    folder = tmp_path / "scans"
    multi = prepare(folder, tmp_path / "m.npz", RECIPE, label_columns=["nodule", "effusion"])
    assert multi.dataset.task == MULTILABEL and multi.dataset.label_names == ["nodule",
                                                                              "effusion"]
    manifest = json.loads(multi.manifest.read_text())
    assert [i["split"] for i in manifest["items"][:6]] == ["train", "val", "test"] * 2
    names = prepare(folder, tmp_path / "g.npz", RECIPE, label_columns=["grade"])
    assert names.dataset.task == MULTICLASS
    assert names.dataset.label_names == ["high", "low", "mid"]


def test_two_dimensional_dicom_images(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    folder = tmp_path / "xrays"
    folder.mkdir()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rows = []
    for k in range(6):
        ds = template.copy()
        stored = np.asarray(template.pixel_array, np.int16) + 40 * k
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.save_as(folder / f"img{k}.dcm")
        rows.append(f"img{k},{k % 2}")
    (folder / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    recipe = Preprocessing(size=(32, 32), spacing=2.0, intensity="zscore", fit="resize")
    result = prepare(folder, tmp_path / "x.npz", recipe)
    assert result.dataset.spatial_dims == 2 and result.dataset.image_shape == (32, 32)
    # predict on the folder of images: one row per .dcm file, the scores of the prepared rows
    from cnnfast.checkpoint import save_checkpoint
    from cnnfast.models import SmallCNN
    from cnnfast.predict import predict_checkpoint
    from cnnfast.train import checkpoint_meta

    ds = load_npz(result.npz)
    model = SmallCNN(channels=(4,), seed=0)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model.state_dict(), checkpoint_meta(model, ds))
    predict_checkpoint(ckpt, folder, tmp_path / "p.csv")
    predict_checkpoint(ckpt, result.npz, tmp_path / "rows.csv", split="train")
    by_scan = {r[0]: r[1:] for r in csv.reader(open(tmp_path / "p.csv"))}
    assert sorted(by_scan) == sorted([f"img{k}.dcm" for k in range(6)] + ["scan"])
    items = [i for i in json.loads(result.manifest.read_text())["items"] if i["split"] == "train"]
    for item, row in zip(items, list(csv.reader(open(tmp_path / "rows.csv")))[1:]):
        np.testing.assert_allclose(np.array(by_scan[item["source"]], float),
                                   np.array(row[1:], float), atol=1e-5)
    with pytest.raises(DataError, match=r"line 2 \(img0\): .*3D images"):
        prepare(folder, tmp_path / "y.npz", RECIPE)
    assert not (tmp_path / "y.npz").exists()


def test_bad_rows_and_files_name_the_line_and_write_nothing(tmp_path):
    folder = tmp_path / "scans"
    write_scans(folder, n_patients=3, per_patient=1)
    out = tmp_path / "o.npz"
    text = (folder / "labels.csv").read_text()
    (folder / "labels.csv").write_text(text + "missing01,P9,1\n")
    with pytest.raises(DataError, match=r"line 5: no scan 'missing01'"):
        prepare(folder, out, RECIPE)
    (folder / "labels.csv").write_text(text)
    broken = sorted((folder / "series00").iterdir())[2]
    broken.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"line 2 \(series00\): .*IM.*not a DICOM file"):
        prepare(folder, out, RECIPE)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert list(tmp_path.glob(".*")) == []  # no temporary file left


def test_bad_labels(tmp_path):
    folder = tmp_path / "scans"
    write_scans(folder, n_patients=3, per_patient=1)
    labels = folder / "labels.csv"
    labels.write_text("id,patient,split,nodule\nseries00,P0,train,1\nvol01,P0,test,0\n"
                      "series02,P1,val,1\n")
    with pytest.raises(DataError, match="patient P0 is put in test .* one split"):
        prepare(folder, tmp_path / "o.npz", RECIPE)
    labels.write_text("id,a,b\nseries00,1,2\nvol01,0,1\nseries02,1,1\n")
    with pytest.raises(DataError, match="line 2: b must be 0 or 1"):
        prepare(folder, tmp_path / "o.npz", RECIPE)
    labels.write_text("id,y\nseries00,1\nseries00,0\n")
    with pytest.raises(DataError, match="listed again"):
        prepare(folder, tmp_path / "o.npz", RECIPE)
    labels.write_text("id,y\nseries00,1\nvol01,0\n")
    with pytest.raises(DataError, match="no scan in the"):
        prepare(folder, tmp_path / "o.npz", RECIPE, val=0.0, test=0.0)
    with pytest.raises(DataError, match="must name a .npz"):
        prepare(folder, tmp_path / "o.csv", RECIPE)


# --- predict on scans ---------------------------------------------------------------------------

def test_predict_on_scans_equals_predict_on_the_prepared_rows(tmp_path):
    from cnnfast.checkpoint import save_checkpoint
    from cnnfast.models import SmallCNN
    from cnnfast.predict import predict_checkpoint
    from cnnfast.train import checkpoint_meta

    folder = tmp_path / "scans"
    write_scans(folder, n_patients=4, per_patient=1)
    result = prepare(folder, tmp_path / "d.npz", RECIPE, val=0.25, test=0.25)
    ds = load_npz(result.npz)
    model = SmallCNN(spatial_dims=3, channels=(4, 8), seed=0)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model.state_dict(), checkpoint_meta(model, ds))
    predict_checkpoint(ckpt, result.npz, tmp_path / "rows.csv", split="train")
    train_ids = [i["source"] for i in json.loads(result.manifest.read_text())["items"]
                 if i["split"] == "train"]
    picked = tmp_path / "picked"
    picked.mkdir()
    for source in train_ids:
        (shutil.copytree if (folder / source).is_dir() else shutil.copy)(folder / source,
                                                                          picked / source)
    predict_checkpoint(ckpt, picked, tmp_path / "scans.csv")
    by_row = list(csv.reader(open(tmp_path / "rows.csv")))
    by_scan = {r[0]: r[1:] for r in csv.reader(open(tmp_path / "scans.csv"))}
    assert by_scan.pop("scan") == by_row[0][1:]
    assert len(by_scan) == len(train_ids)
    for source, row in zip(train_ids, by_row[1:]):
        np.testing.assert_allclose(np.array(by_scan[source], float), np.array(row[1:], float),
                                   atol=1e-5)
    # one series folder on its own is one scan
    predict_checkpoint(ckpt, folder / "series00", tmp_path / "one.csv")
    assert len(list(csv.reader(open(tmp_path / "one.csv")))) == 2


def test_predict_on_scans_needs_a_recipe(tmp_path):
    from cnnfast.checkpoint import save_checkpoint
    from cnnfast.models import SmallCNN
    from cnnfast.predict import predict_checkpoint
    from cnnfast.train import checkpoint_meta

    folder = tmp_path / "scans"
    write_scans(folder, n_patients=3, per_patient=1)
    ds = prepare(folder, tmp_path / "d.npz", RECIPE).dataset
    ds.preprocessing = None
    model = SmallCNN(spatial_dims=3, channels=(4,), seed=0)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model.state_dict(), checkpoint_meta(model, ds))
    with pytest.raises(DataError, match="records none"):
        predict_checkpoint(ckpt, folder, tmp_path / "p.csv")


# --- the command line, end to end ---------------------------------------------------------------

def test_cli_prepare_train_predict(tmp_path, capsys):
    from cnnfast.checkpoint import load_checkpoint
    from cnnfast.cli import main

    folder = tmp_path / "scans"
    rows = write_scans(folder, n_patients=5, per_patient=2)
    npz = tmp_path / "prepared" / "nodules.npz"
    assert main(["prepare", "--scans", str(folder), "--out", str(npz), "--size", "6x10x10",
                 "--spacing", "3,2,2", "--window", "mediastinum", "--val", "0.2", "--test", "0.2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "binary-class" in out and "cnnfast train --data" in out
    assert npz.with_suffix(".json").is_file()
    run = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--model", "smallcnn", "--channels", "2", "4",
                 "--epochs", "1", "--batch-size", "4", "--no-progress", "--out", str(run)]) == 0
    ckpt = load_checkpoint(run / "smallcnn.ckpt")
    assert ckpt.header["preprocessing"] == RECIPE.to_dict()
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "smallcnn.ckpt"), "--data", str(folder),
                 "--out", str(tmp_path / "preds.csv"), "--no-progress"]) == 0
    assert f"{len(rows)} predictions written" in capsys.readouterr().out
    table = list(csv.reader(open(tmp_path / "preds.csv")))
    assert table[0] == ["scan", "nodule=0", "nodule=1"]
    assert sorted(r[0] for r in table[1:]) == sorted(r["id"] for r in rows)
    probabilities = np.array([r[1:] for r in table[1:]], float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_cli_prepare_bad_input_is_one_line(tmp_path, capsys):
    from cnnfast.cli import main

    folder = tmp_path / "scans"
    write_scans(folder, n_patients=3, per_patient=1)
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--scans", str(folder), "--out", str(tmp_path / "o.npz"),
              "--size", "6x10x10", "--window", "liver"])
    assert exit_.value.code == 2
    assert "--window: expected a preset (lung, mediastinum" in capsys.readouterr().err
    assert main(["prepare", "--scans", str(folder), "--out", str(tmp_path / "o.npz"),
                 "--size", "6x10", "--spacing", "1,1,1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnfast prepare: error: spacing must be") and "\n" not in err
    assert main(["prepare", "--scans", str(folder), "--out", str(tmp_path / "o.npz"),
                 "--size", "6x10", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2 (series00)" in err and "2D images" in err and "\n" not in err
    assert not (tmp_path / "o.npz").exists()
