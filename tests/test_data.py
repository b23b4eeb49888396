"""Data: MedMNIST .npz loading and validation, download, synthetic data, transforms, DataLoader."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from cnnfast import synthetic
from cnnfast.data import (
    BINARY,
    MEDMNIST,
    MULTICLASS,
    MULTILABEL,
    DataError,
    DataLoader,
    DownloadError,
    Normalization,
    Split,
    channels_first,
    download,
    load_dataset,
    load_npz,
    save_npz,
)
from cnnfast.transforms import (
    CenterCrop,
    Compose,
    RandomFlip,
    Resize,
    center_crop,
    normalize,
    random_flip,
    resize,
)


def _arrays(shape=(6, 6), n=(5, 3, 4), labels_per=1, top=1, dtype=np.uint8, seed=0):
    """MedMNIST-layout arrays: images (N, *shape), labels (N, labels_per) in 0..top."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape)).astype(dtype)
        lab = rng.integers(0, top + 1, (count, labels_per))
        lab[0] = 0
        lab[1] = top  # every split holds both extremes
        if split == "train" and labels_per == 1:
            lab[:min(count, top + 1), 0] = np.arange(min(count, top + 1))  # every class
        arrays[f"{split}_labels"] = lab
    return arrays


def _write(tmp_path: Path, name: str, arrays: dict) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# --- loading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expected, dims", [
    ((6, 7), (1, 6, 7), 2),            # 2D grey  N x H x W
    ((6, 7, 3), (3, 6, 7), 2),         # 2D RGB   N x H x W x 3
    ((4, 6, 7), (1, 4, 6, 7), 3),      # 3D       N x D x H x W
])
def test_load_npz_layouts_channels_first(tmp_path, shape, expected, dims):
    arrays = _arrays(shape)
    ds = load_npz(_write(tmp_path, "mine.npz", arrays))
    assert ds.train.images.shape == (5, *expected)
    assert ds.spatial_dims == dims and ds.in_channels == expected[0]
    assert ds.train.images.dtype == np.uint8
    assert ds.task == BINARY and ds.label_names == ["0", "1"]
    assert ds.test.labels.shape == (4, 1) and ds.test.labels.dtype == np.int64
    if shape[-1] == 3:  # RGB: channel c of pixel (h, w) is the file's [..., h, w, c]
        np.testing.assert_array_equal(ds.val.images[2, 1, 3, 4], arrays["val_images"][2, 3, 4, 1])
    else:
        np.testing.assert_array_equal(ds.val.images[:, 0], arrays["val_images"])


def test_task_inference_and_registry_names(tmp_path):
    multi = load_npz(_write(tmp_path, "a.npz", _arrays(top=4)))
    assert multi.task == MULTICLASS and multi.num_outputs == 5
    multilabel = load_npz(_write(tmp_path, "b.npz", _arrays(labels_per=3)))
    assert multilabel.task == MULTILABEL and multilabel.num_outputs == 3
    # a MedMNIST file name brings the record's task and label names
    chest = load_npz(_write(tmp_path, "chestmnist_64.npz", _arrays(labels_per=14)))
    assert chest.task == MULTILABEL and chest.label_names[1] == "cardiomegaly"
    nodule = load_npz(_write(tmp_path, "nodulemnist3d.npz", _arrays((4, 5, 5))))
    assert nodule.task == BINARY and nodule.label_names == ["benign", "malignant"]
    assert nodule.spatial_dims == 3


def test_save_npz_round_trip(tmp_path):
    ds = synthetic.chestxray_dataset(6, 3, 4, seed=2, size=16)
    again = load_npz(save_npz(tmp_path / "x" / "cxr.npz", ds))
    assert again.task == MULTILABEL and again.label_names == list(synthetic.FINDINGS)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(again.split(s).images, ds.split(s).images)
        np.testing.assert_array_equal(again.split(s).labels, ds.split(s).labels)
    assert not list((tmp_path / "x").glob(".*tmp"))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("val_labels"), "missing key(s) val_labels"),
    (lambda a: a.update(test_labels=a["test_labels"][:-1]), "test_images has 4 images but "
                                                            "test_labels has 3 labels"),
    (lambda a: a.update(train_images=np.zeros((5, 2, 3, 4, 5), np.uint8)), "got rank 5"),
    (lambda a: a.update(train_images=np.zeros((5, 6), np.uint8)), "got rank 2"),
    (lambda a: a.update(val_labels=np.full((3, 1), -1)), "label -1 out of range"),
    (lambda a: a.update(val_images=np.zeros((3, 7, 7), np.uint8)), "image shapes differ"),
    (lambda a: a.update(train_labels=np.full((5, 1), 0.5)), "non-integer"),
    (lambda a: a.update(train_images=np.zeros((5, 6, 6), "U1")), "dtype"),
])
def test_bad_npz_is_refused_clearly(tmp_path, mutate, message):
    arrays = _arrays()
    mutate(arrays)
    with pytest.raises(DataError, match=re.escape(message)):
        load_npz(_write(tmp_path, "bad.npz", arrays))


def test_labels_out_of_range_for_a_known_task(tmp_path):
    arrays = _arrays(top=2)  # labels 0..2 in a file named like a binary MedMNIST set
    with pytest.raises(DataError, match="label 2 out of range: binary-class labels must lie in "
                                        "0..1"):
        load_npz(_write(tmp_path, "breastmnist.npz", arrays))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_npz(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(junk)
    with pytest.raises(DataError, match="unknown dataset 'nosuchmnist'"):
        load_dataset("nosuchmnist", root=tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dataset("breastmnist", root=tmp_path, download_missing=False)
    with pytest.raises(DataError, match="sizes \\[28, 64\\]"):
        load_dataset("nodulemnist3d", size=128, root=tmp_path)


def test_channels_first_respects_explicit_rank():
    vol = np.zeros((2, 4, 5, 3), np.uint8)  # 3D volumes whose W happens to be 3
    assert channels_first(vol, spatial_dims=3).shape == (2, 1, 4, 5, 3)
    assert channels_first(vol).shape == (2, 3, 4, 5)


# --- the MedMNIST registry and download ---------------------------------------------------------

def test_registry_has_the_datasets_and_md5s():
    for name in ("pneumoniamnist", "nodulemnist3d", "chestmnist", "breastmnist", "organmnist3d"):
        assert name in MEDMNIST
    for info in MEDMNIST.values():
        assert 28 in info.md5 and 64 in info.md5
        assert set(info.md5) == ({28, 64, 128, 224} if info.spatial_dims == 2 else {28, 64})
        assert all(re.fullmatch(r"[0-9a-f]{32}", m) for m in info.md5.values())
    assert MEDMNIST["pneumoniamnist"].md5[28] == "28209eda62fecd6e6a2d98b1501bb15f"
    assert MEDMNIST["chestmnist"].url(64) == (
        "https://zenodo.org/records/10519652/files/chestmnist_64.npz?download=1")
    assert len(MEDMNIST["chestmnist"].label_names) == 14


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


def test_download_from_local_server_checks_md5(tmp_path, file_server):
    base_url, served = file_server
    src = _write(served, "breastmnist.npz", _arrays())
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    root = tmp_path / "root"
    path = download("breastmnist", root=root, base_url=base_url, md5=md5, progress=False)
    assert path == root / "breastmnist.npz" and path.read_bytes() == src.read_bytes()
    assert load_dataset("breastmnist", root=root).task == BINARY  # found, not re-downloaded
    assert [p.name for p in root.iterdir()] == ["breastmnist.npz"]

    # the served file is not the MedMNIST release: the real MD5 does not match, nothing is kept
    with pytest.raises(DownloadError, match="has MD5 .* expected 750601b1f35ba3300ea97c75c52ff8f6"):
        download("breastmnist", root=tmp_path / "r2", base_url=base_url, progress=False)
    assert not (tmp_path / "r2").exists()

    with pytest.raises(DownloadError, match="could not download pneumoniamnist_64.npz .*HTTP 404"):
        download("pneumoniamnist", size=64, root=tmp_path / "r3", base_url=base_url,
                 progress=False)
    assert not (tmp_path / "r3").exists()
    (tmp_path / "r4").mkdir()  # a root that was there stays
    with pytest.raises(DownloadError):
        download("pneumoniamnist", size=64, root=tmp_path / "r4", base_url=base_url,
                 progress=False)
    assert list((tmp_path / "r4").iterdir()) == []


def test_download_offline_is_a_clear_error(tmp_path, file_server):
    base_url, _ = file_server
    port = int(base_url.rsplit(":", 1)[1])
    import socket

    with socket.socket() as s:  # a port with nothing listening: connection refused, like offline
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert int(dead.rsplit(":", 1)[1]) != port
    with pytest.raises(DownloadError, match="If this machine is offline"):
        download("nodulemnist3d", root=tmp_path / "r", base_url=dead, progress=False, timeout=5)


# --- synthetic data -----------------------------------------------------------------------------

def test_synthetic_nodules_deterministic_and_balanced():
    x1, y1 = synthetic.nodule_ct(20, seed=5)
    x2, y2 = synthetic.nodule_ct(20, seed=5)
    x3, _ = synthetic.nodule_ct(20, seed=6)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (20, 1, 28, 28) and x1.dtype == np.uint8 and y1.shape == (20, 1)
    assert y1.sum() == 10
    x3d, y3d = synthetic.nodule_ct(4, seed=0, spatial_dims=3, size=12)
    assert x3d.shape == (4, 1, 12, 12, 12) and y3d.sum() == 2


def test_synthetic_nodule_is_visible_where_drawn():
    # Same random stream up to the nodule: the positive image is brighter somewhere in a lung.
    x, y = synthetic.nodule_ct(200, seed=3)
    pos, neg = x[y[:, 0] == 1].astype(float), x[y[:, 0] == 0].astype(float)
    peak = lambda a: np.sort(a.reshape(len(a), -1), axis=1)[:, -8:].mean(1)  # noqa: E731
    assert peak(pos).mean() > peak(neg).mean()


def test_synthetic_splits_independent_of_other_split_sizes():
    a = synthetic.nodule_dataset(10, 4, 6, seed=1)
    b = synthetic.nodule_dataset(20, 4, 6, seed=1)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    assert a.synthetic and a.task == BINARY and a.label_names == ["no nodule", "nodule"]


def test_synthetic_chest_xray_multilabel():
    ds = synthetic.load("synthetic-chestxray", seed=0, n_train=40, n_val=10, n_test=10)
    assert ds.task == MULTILABEL and ds.label_names == list(synthetic.FINDINGS)
    assert ds.train.labels.shape == (40, 6) and set(np.unique(ds.train.labels)) <= {0, 1}
    assert ds.train.images.shape == (40, 1, 28, 28)
    # every finding changes the picture on its own: draw one image per finding from one seed
    images = []
    for j in range(7):
        findings = np.zeros(6, bool)
        if j < 6:
            findings[j] = True
        rng = np.random.default_rng(0)
        images.append(synthetic._chest_xray(rng, synthetic._grid((28, 28)), 28, findings))
    for j in range(6):
        assert np.abs(images[j] - images[6]).max() > 0.1, synthetic.FINDINGS[j]
    with pytest.raises(DataError, match="unknown synthetic dataset"):
        synthetic.load("synthetic-nothing")


# --- transforms ---------------------------------------------------------------------------------

def test_center_crop_and_resize():
    x = np.arange(2 * 1 * 6 * 7, dtype=np.float32).reshape(2, 1, 6, 7)
    np.testing.assert_array_equal(center_crop(x, 4), x[:, :, 1:5, 2:6])
    np.testing.assert_array_equal(center_crop(x, (6, 7)), x)
    with pytest.raises(ValueError, match="larger than the images"):
        center_crop(x, 8)
    assert resize(x, (6, 7)).dtype == np.float32
    np.testing.assert_allclose(resize(x, (6, 7)), x)
    np.testing.assert_allclose(resize(np.ones((1, 2, 3, 4, 5)), 7), np.ones((1, 2, 7, 7, 7)))
    # halving averages neighbour pairs (half-pixel centres)
    row = np.array([0.0, 2.0, 4.0, 6.0], np.float32).reshape(1, 1, 1, 4)
    np.testing.assert_allclose(resize(row, (1, 2)), [[[[1.0, 5.0]]]])


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 9, 13)).astype(np.float32)
    ours = resize(x, (14, 6))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x), size=(14, 6), mode="bilinear",
                                             align_corners=False).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    v = rng.random((1, 1, 5, 6, 7)).astype(np.float32)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(v), size=(8, 3, 9),
                                             mode="trilinear", align_corners=False).numpy()
    np.testing.assert_allclose(resize(v, (8, 3, 9)), theirs, atol=1e-5)


def test_normalize_matches_medmnist():
    x = np.array([0, 51, 255], np.uint8).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(normalize(x), [[[[-1.0, -0.6, 1.0]]]], atol=1e-6)
    np.testing.assert_allclose(Normalization()(x), normalize(x))
    assert Normalization.medmnist(3) == Normalization(1 / 255, 0.0, 1.0)
    per_channel = normalize(np.full((1, 2, 1, 1), 255, np.uint8), mean=[0.0, 0.5], std=[1, 0.25])
    np.testing.assert_allclose(per_channel.ravel(), [1.0, 2.0])


def test_random_flip_seeded():
    x = np.arange(4 * 1 * 2 * 3, dtype=np.float32).reshape(4, 1, 2, 3)
    a = random_flip(x, np.random.default_rng(0), p=0.5)
    b = RandomFlip(p=0.5)(x, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    for i in range(4):
        assert np.array_equal(a[i], x[i]) or np.array_equal(a[i], x[i, :, :, ::-1])
    np.testing.assert_array_equal(random_flip(x, np.random.default_rng(0), axes=(0, 1), p=1.0),
                                  x[:, :, ::-1, ::-1])
    out = Compose([CenterCrop(2), Resize(4)])(x, None)
    assert out.shape == (4, 1, 4, 4)


# --- DataLoader ---------------------------------------------------------------------------------

def test_dataloader_batches_cover_split_once():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10).reshape(10, 1)
    loader = DataLoader(Split(images, labels), batch_size=4, shuffle=True, seed=3)
    assert len(loader) == 3
    epoch1 = list(loader)
    assert [len(x) for x, _ in epoch1] == [4, 4, 2]
    seen = np.concatenate([y[:, 0] for _, y in epoch1])
    assert sorted(seen) == list(range(10))
    for x, y in epoch1:  # images stay with their labels
        np.testing.assert_array_equal(x[:, 0, 0, 0], y[:, 0])
        assert x.dtype == np.float32
    epoch2 = np.concatenate([y[:, 0] for _, y in loader])
    assert not np.array_equal(seen, epoch2)  # a new order each epoch...
    again = DataLoader((images, labels), batch_size=4, shuffle=True, seed=3)
    np.testing.assert_array_equal(np.concatenate([y[:, 0] for _, y in again]), seen)  # ...seeded

    dropped = DataLoader((images, labels), batch_size=4, drop_last=True)
    assert len(dropped) == 2 and [len(x) for x, _ in dropped] == [4, 4]
    ordered = np.concatenate([y[:, 0] for _, y in DataLoader((images, labels), batch_size=3)])
    np.testing.assert_array_equal(ordered, np.arange(10))


def test_dataloader_normalizes_and_validates():
    images = np.full((3, 1, 2, 2), 255, np.uint8)
    (x, _), = DataLoader((images, np.zeros((3, 1))), batch_size=8,
                         normalization=Normalization())
    np.testing.assert_allclose(x, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        DataLoader((images, np.zeros((2, 1))))
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader((images, np.zeros((3, 1))), batch_size=0)
