"""Checkpoint file format: round trip, atomic writes, and refusal of damaged or mismatched files."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import pytest

from cnnfast.checkpoint import (
    FORMAT_VERSION,
    MAGIC,
    CheckpointError,
    decode,
    encode,
    load_checkpoint,
    save_checkpoint,
)
from cnnfast.models import SmallCNN, resnet18
from cnnfast.train import load_weights, model_from_checkpoint

META = {"model": {"name": "smallcnn", "kwargs": {}}, "task": "binary-class",
        "label_names": ["no", "yes"], "normalization": {"scale": 1 / 255, "mean": 0.5, "std": 0.5},
        "metrics": {"val": {"auc": 0.9}}}


def _state():
    rng = np.random.default_rng(0)
    return OrderedDict([
        ("conv.weight", rng.normal(size=(4, 1, 3, 3)).astype(np.float32)),
        ("conv.bias", np.arange(4, dtype=np.float64)),
        ("bn.num_batches", np.array(7, dtype=np.int64)),
        ("empty", np.zeros((0, 3), np.float32)),
    ])


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "m.ckpt", _state(), META)
    ckpt = load_checkpoint(path)
    assert list(ckpt.state_dict) == list(_state())
    for name, value in _state().items():
        got = ckpt.state_dict[name]
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got, value)
        assert got.flags.writeable
    assert ckpt.task == "binary-class" and ckpt.label_names == ["no", "yes"]
    assert ckpt.metrics == {"val": {"auc": 0.9}} and ckpt.normalization["std"] == 0.5
    assert ckpt.header["library_version"] and ckpt.header["created_utc"].endswith("Z")
    assert path.read_bytes()[:8] == MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["m.ckpt"]  # no temp file left


def test_no_pickle_and_readable_header(tmp_path):
    path = save_checkpoint(tmp_path / "m.ckpt", _state(), META)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[12:20], "little")
    header = json.loads(raw[20:20 + header_len])
    assert header["format"] == "cnnfast-checkpoint" and header["task"] == "binary-class"
    assert int.from_bytes(raw[8:12], "little") == FORMAT_VERSION
    assert b"\x80\x04" not in raw[:20]  # not a pickle stream


def test_failed_save_keeps_previous_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.ckpt", _state(), META)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(path, _state(), {"metrics": object()})
    with pytest.raises(CheckpointError, match="cannot be stored"):
        save_checkpoint(path, {"x": np.array(["a"])}, META)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]


@pytest.mark.parametrize("where", ["header", "payload", "digest"])
def test_corruption_is_refused(tmp_path, where):
    raw = bytearray(encode(_state(), META))
    header_len = int.from_bytes(raw[12:20], "little")
    index = {"header": 20 + header_len // 2, "payload": 20 + header_len + 5,
             "digest": len(raw) - 3}[where]
    raw[index] ^= 0x01
    path = tmp_path / "bad.ckpt"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 5, 19, 40, -33, -1])
def test_truncation_is_refused(tmp_path, keep):
    raw = encode(_state(), META)
    cut = raw[:keep] if keep >= 0 else raw[:len(raw) + keep]
    path = tmp_path / "cut.ckpt"
    path.write_bytes(cut)
    with pytest.raises(CheckpointError, match="truncated|too small"):
        load_checkpoint(path)


def test_other_damage(tmp_path):
    raw = encode(_state(), META)
    with pytest.raises(CheckpointError, match="trailing data"):
        decode(raw + b"xx")
    with pytest.raises(CheckpointError, match="not a cnnfast checkpoint"):
        decode(b"PK\x03\x04" + raw[4:])
    with pytest.raises(CheckpointError, match="format version 99"):
        decode(raw[:8] + (99).to_bytes(4, "little") + raw[12:])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    directory = tmp_path / "dir.ckpt"
    directory.mkdir()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(directory)


def test_model_round_trip_and_other_architecture(tmp_path):
    model = SmallCNN(1, 2, channels=(4, 8), seed=1)
    path = save_checkpoint(tmp_path / "small.ckpt", model.state_dict(), {"model": model.config})
    rebuilt = model_from_checkpoint(path)
    assert type(rebuilt) is SmallCNN and not rebuilt.training
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)

    other = resnet18(1, 2, width=4, seed=0)
    before = other.state_dict()
    with pytest.raises(CheckpointError, match="weights of a 'smallcnn' model do not fit this "
                                              "'resnet18' model"):
        load_weights(other, path)
    for name, value in other.state_dict().items():  # nothing half-loaded
        np.testing.assert_array_equal(value, before[name])

    wider = SmallCNN(1, 2, channels=(4, 16))
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(wider, path)

    bad = save_checkpoint(tmp_path / "alien.ckpt", model.state_dict(),
                          {"model": {"name": "vgg99", "kwargs": {}}})
    with pytest.raises(CheckpointError, match="cannot rebuild its model .*unknown model 'vgg99'"):
        model_from_checkpoint(bad)
    os.remove(bad)
