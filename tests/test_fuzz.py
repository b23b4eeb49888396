"""Fuzzing (hypothesis) of what reads untrusted bytes: the checkpoint / training-state reader, the
``.npz`` loader and the download's file handling.

Each target gets random bytes, damaged valid files (truncations, bit flips, inserted and deleted
bytes), and structure-aware inputs (headers re-signed with a valid checksum, ``.npy`` headers that
declare huge shapes, zip bombs, pickled objects, members of the wrong kind, lying sizes). What
must hold: only the documented error comes out (``CheckpointError`` / ``TrainingStateError`` /
``DataError`` / ``DownloadError``), nothing hangs (each example runs under a time limit), and
memory stays bounded (tracemalloc peak per example, which counts NumPy's buffers).

In CI the examples are a fixed, derandomised set (``CNNFAST_FUZZ_EXAMPLES`` per target, default
small, well under a minute in all). A longer campaign with fresh randomness:

    nice -n 19 python tests/test_fuzz.py --seconds 600     # prints executions and findings
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import signal
import socket
import struct
import sys
import tracemalloc
import urllib.error
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cnnfast import config  # noqa: E402
from cnnfast import data as data_mod  # noqa: E402
from cnnfast.checkpoint import CheckpointError, decode, encode  # noqa: E402
from cnnfast.data import DataError, DownloadError, load_npz  # noqa: E402
from cnnfast.state import TrainingStateError, decode_state  # noqa: E402

EXAMPLES = config.get("fuzz_examples")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
MEMORY_LIMIT = 64 << 20   # bytes allocated at the peak of one example (inputs are < 1 MB)
TIME_LIMIT = 10           # CPU seconds one example may take


@contextmanager
def bounded(limit: int = MEMORY_LIMIT, seconds: int = TIME_LIMIT):
    """Fail when the block allocates more than ``limit`` bytes at its peak or uses more than
    ``seconds`` of CPU (SIGPROF: a hang becomes an exception)."""
    def timeout(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s of CPU: a hang")

    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    # CPU time, not wall time: a loop that never ends burns CPU, while a busy shared machine
    # (or nice -n 19) only stretches the wall clock
    old = signal.signal(signal.SIGPROF, timeout)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
        peak = tracemalloc.get_traced_memory()[1] - base
        if not started:
            tracemalloc.stop()
    assert peak <= limit, f"{peak:,} bytes allocated, more than {limit:,}"


def _only(errors, fn, *args, **kwargs):
    """Call ``fn``; any exception other than ``errors`` fails the example."""
    try:
        return fn(*args, **kwargs)
    except errors:
        return None


# --- damage applied to valid bytes --------------------------------------------------------------

@st.composite
def damaged(draw, original: bytes) -> bytes:
    raw = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite"]))
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        if kind == "truncate":
            del raw[at:]
        elif kind == "flip":
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 16))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            raw[at:at + len(chunk)] = chunk
    return bytes(raw)


# --- target 1: the checkpoint and training-state reader ----------------------------------------

def _valid_checkpoint() -> bytes:
    rng = np.random.default_rng(0)
    return encode({"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                   "conv.bias": np.zeros(4, np.float32), "steps": np.arange(3, dtype=np.int64)},
                  {"model": {"name": "smallcnn", "kwargs": {}}, "task": "binary-class"})


VALID_CKPT = _valid_checkpoint()
_PREFIX = struct.Struct("<8sIQ")


def _signed(header: dict | str, payload: bytes, header_len: int | None = None) -> bytes:
    """A checkpoint with ``header`` (a dict, or raw text) and a correct SHA-256."""
    text = header if isinstance(header, str) else json.dumps(header)
    blob = text.encode("utf-8", "surrogatepass")
    body = _PREFIX.pack(b"CNNFCKPT", 1, len(blob) if header_len is None else header_len)
    body += blob + payload
    return body + hashlib.sha256(body).digest()


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False), st.text(max_size=8))
tensor_entries = st.fixed_dictionaries({
    "name": st.one_of(st.text(max_size=6), st.integers(), st.none()),
    "dtype": st.one_of(st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "float16",
                                        "object", "V8", "<U3", "S4", "complex64", "bogus"]),
                       json_scalars),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_scalars,
                       st.lists(json_scalars, max_size=3)),
    "offset": st.one_of(st.integers(-8, 2**62), json_scalars),
    "nbytes": st.one_of(st.integers(-8, 2**62), json_scalars),
})


def _valid_state() -> bytes:
    from cnnfast.state import TrainingState, encode_state

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    return encode_state(TrainingState(
        signature={"model": {"name": "m"}}, model={"w": w},
        optimizer={"param_groups": [{"lr": 0.1, "betas": [0.9, 0.999]}],
                   "state": {0: {"step": 3, "exp_avg": w, "exp_avg_sq": w}}},
        schedule_epoch=1, rng={"global": {}, "loader": {}}, order=np.arange(4),
        best_state={"w": w}, history=[{"epoch": 1, "val_auc": float("nan")}]))


VALID_STATE = _valid_state()
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3),
    st.builds(lambda v: {"__float__": v}, inner)), max_leaves=8)


@st.composite
def state_bytes(draw) -> bytes:
    """A training-state file whose (checksummed) header has fields replaced by odd values."""
    body = VALID_STATE[:-32]
    header_len = struct.unpack_from("<Q", body, 12)[0]
    header = json.loads(body[20:20 + header_len])
    for key in draw(st.lists(st.sampled_from(sorted(header)), min_size=1, max_size=4)):
        header[key] = draw(json_values)
    return _signed(header, body[20 + header_len:])


@st.composite
def checkpoint_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "damaged", "resigned", "header text", "huge sizes",
                                 "state fields", "damaged state"]))
    if kind == "state fields":
        return draw(state_bytes())
    if kind == "damaged state":
        return draw(damaged(VALID_STATE))
    if kind == "random":
        return draw(st.one_of(st.binary(max_size=256),
                              st.binary(max_size=64).map(lambda b: b"CNNFCKPT" + b)))
    if kind == "damaged":
        return draw(damaged(VALID_CKPT))
    payload = draw(st.binary(max_size=128))
    if kind == "resigned":
        header = {"format": "cnnfast-checkpoint",
                  "tensors": draw(st.one_of(st.lists(tensor_entries, max_size=3), json_scalars)),
                  "payload_nbytes": draw(st.one_of(st.just(len(payload)), st.integers(-5, 2**63),
                                                   json_scalars))}
        if draw(st.booleans()):
            header = draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=3)))
        return _signed(header, payload)
    if kind == "header text":  # not JSON, deeply nested JSON, bad UTF-8
        text = draw(st.one_of(st.text(max_size=40), st.integers(1, 100_000).map(
            lambda n: "[" * n + "]" * n), st.integers(1, 100_000).map(
            lambda n: '{"a":' * n + "1" + "}" * n)))
        return _signed(text, payload)
    return _signed({"tensors": [], "payload_nbytes": 0}, payload,
                   header_len=draw(st.integers(0, 2**64 - 1)))


def check_checkpoint(raw: bytes, tmp: Path) -> None:
    with bounded():
        _only(CheckpointError, decode, raw, "fuzz.ckpt")
        _only(TrainingStateError, decode_state, raw, "fuzz.state")


@FUZZ
@given(checkpoint_bytes())
def test_fuzz_checkpoint_reader(raw):
    check_checkpoint(raw, Path("."))


def test_checkpoint_reader_specific_cases():
    """Inputs found by (or written for) the fuzzer, kept as plain regression cases."""
    payload = np.arange(4, dtype=np.float32).tobytes()
    good = {"name": "w", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}
    cases = {
        "negative dimension": dict(good, shape=[-1]),
        "overflowing shape": dict(good, shape=[2**40, 2**40, 2**40]),
        "unknown dtype": dict(good, dtype="bogus"),
        "object dtype": dict(good, dtype="object"),
        "negative offset": dict(good, offset=-4),
        "offset past payload": dict(good, offset=2**62),
        "shape not a list": dict(good, shape="4"),
        "name not text": dict(good, name=None),
        "nbytes disagrees": dict(good, nbytes=8),
    }
    for what, entry in cases.items():
        raw = _signed({"tensors": [entry], "payload_nbytes": 16}, payload)
        with bounded(), pytest.raises(CheckpointError):
            decode(raw, what)
    for header in ([1, 2], "null", '"text"', "[" * 50_000 + "]" * 50_000):
        raw = _signed(header if isinstance(header, str) else json.dumps(header), payload)
        with bounded(), pytest.raises(CheckpointError):
            decode(raw, "odd header")
    # found by fuzzing the training-state header: a float where an int belongs, a bad float
    body = VALID_STATE[:-32]
    header_len = struct.unpack_from("<Q", body, 12)[0]
    for key, value in (("epochs_done", {"__float__": "inf"}), ("loss_sum", {"__float__": "x"}),
                       ("optimizer", {"state": [1]}), ("history", {"__float__": [1]})):
        header = json.loads(body[20:20 + header_len])
        header[key] = value
        with bounded(), pytest.raises(TrainingStateError):
            decode_state(_signed(header, body[20 + header_len:]), key)
    ok = decode(_signed({"tensors": [good], "payload_nbytes": 16}, payload))
    np.testing.assert_array_equal(ok.state_dict["w"], np.arange(4, dtype=np.float32))


# --- target 2: the .npz loader ----------------------------------------------------------------

def _npz_bytes(arrays: dict, compress: bool = True) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _valid_arrays() -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 5, 5)).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    return arrays


VALID_NPZ = _npz_bytes(_valid_arrays())
VALID_NPZ_STORED = _npz_bytes(_valid_arrays(), compress=False)


def _npy_header(shape, dtype="|u1", fortran=False, version=1) -> bytes:
    text = "{'descr': %r, 'fortran_order': %r, 'shape': %r, }" % (dtype, fortran, tuple(shape))
    pad = (64 - (10 + len(text) + 1) % 64) % 64
    text = text + " " * pad + "\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text)) + text.encode("latin1")


def _zip(members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return buffer.getvalue()


@st.composite
def npz_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "damaged", "damaged stored", "declared shape",
                                 "bomb", "members"]))
    if kind == "random":
        return draw(st.one_of(st.binary(max_size=256),
                              st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b),
                              st.binary(max_size=64).map(lambda b: b"\x93NUMPY\x01\x00" + b)))
    if kind == "damaged":
        return draw(damaged(VALID_NPZ))
    if kind == "damaged stored":
        return draw(damaged(VALID_NPZ_STORED))
    if kind == "declared shape":  # a .npy header whose shape does not match its bytes
        shape = draw(st.lists(st.integers(0, 2**45), min_size=0, max_size=4))
        dtype = draw(st.sampled_from(["|u1", "<f4", "<f8", "<i8", "|O", "<U4", "|b1", "<c8",
                                      "[('a', '<i4')]", "V3"]))
        data = draw(st.binary(max_size=64))
        arrays = {f"{s}_{k}.npy": _npy_header(shape, dtype, draw(st.booleans()),
                                              draw(st.sampled_from([1, 2]))) + data
                  for s in ("train", "val", "test") for k in ("images", "labels")}
        return _zip(arrays, draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])))
    if kind == "bomb":  # honest header, 256 MB of zeros deflated to a few hundred KB
        n = draw(st.sampled_from([1 << 26, 1 << 28]))
        return _bomb(n)
    # members of the wrong kind or name
    members = {"train_images.npy": _npy_header((2, 2)) + bytes(4)}
    members[draw(st.sampled_from(["notes.txt", "x.npy", "train_images.npy", "dir/",
                                  "val_labels.npy"]))] = draw(st.binary(max_size=32))
    return _zip(members)


_BOMBS: dict[int, bytes] = {}


def _bomb(nbytes: int) -> bytes:
    """A zip whose one .npy member inflates to ``nbytes`` of zeros (built once, streamed)."""
    if nbytes not in _BOMBS:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            with z.open("train_images.npy", "w", force_zip64=True) as f:
                f.write(_npy_header((nbytes // 64, 8, 8)))
                zeros = bytes(1 << 20)
                for _ in range(nbytes // len(zeros)):
                    f.write(zeros)
        _BOMBS[nbytes] = buffer.getvalue()
    return _BOMBS[nbytes]


def check_npz(raw: bytes, tmp: Path) -> None:
    path = tmp / "fuzz.npz"
    path.write_bytes(raw)
    with bounded():
        _only(DataError, load_npz, path, max_bytes=32 << 20)


@FUZZ
@given(npz_bytes())
def test_fuzz_npz_loader(tmp_path, raw):
    check_npz(raw, tmp_path)


def test_npz_loader_specific_cases(tmp_path):
    """Zip bombs, lying headers and pickles: refused before any large allocation."""
    cases = {
        "bomb.npz": (_bomb(1 << 26), "more than the 33,554,432 allowed"),
        "huge.npz": (_zip({"train_images.npy": _npy_header((2**40, 2**20)) + bytes(16)}),
                     "bytes of data"),
        "pickle.npz": (_npz_bytes({"x": np.array([{"a": 1}], dtype=object)}), "never pickled"),
        "array.npz": (VALID_NPZ_STORED[:0] + _npy_header((3,)) + bytes(3), "not a readable"),
        "member.npz": (_zip({"notes.txt": b"hello"}), "not a .npy member"),
        "stored-then-cut.npz": (VALID_NPZ_STORED[:len(VALID_NPZ_STORED) // 2], "not a readable"),
        # found by the campaign: 0-d images escaped as "TypeError: len() of unsized object"
        "scalar.npz": (_npz_bytes({**_valid_arrays(), "val_images": np.uint8(3)}), "got rank 0"),
    }
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with bounded(), pytest.raises(DataError, match=message):
            load_npz(tmp_path / name, max_bytes=32 << 20)
    # what is valid still loads, Fortran order included
    arrays = _valid_arrays()
    arrays["train_images"] = np.asfortranarray(arrays["train_images"])
    (tmp_path / "ok.npz").write_bytes(_npz_bytes(arrays))
    ds = load_npz(tmp_path / "ok.npz")
    np.testing.assert_array_equal(ds.train.images[:, 0], arrays["train_images"])


# --- target 3: the download's file handling ---------------------------------------------------

class _FakeResponse:
    """What ``urlopen`` returns, serving fuzzed bytes and headers, failing where told to."""

    def __init__(self, chunks, length, fail):
        self._chunks, self._fail = list(chunks), fail
        self.headers = {} if length is None else {"Content-Length": length}

    def read(self, n=-1):
        if self._fail is not None and len(self._chunks) <= self._fail[0]:
            raise self._fail[1]
        return self._chunks.pop(0) if self._chunks else b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Endless(_FakeResponse):
    def read(self, n=-1):
        return bytes(1 << 16)


failures = st.sampled_from([
    ConnectionResetError(104, "Connection reset by peer"), socket.timeout("timed out"),
    http.client.IncompleteRead(b"partial", 100), http.client.RemoteDisconnected("closed"),
    urllib.error.URLError("no route"), OSError(28, "No space left on device"),
])


@st.composite
def server_behaviour(draw):
    body_chunks = draw(st.lists(st.binary(min_size=1, max_size=2048), max_size=6))  # b"": EOF
    length = draw(st.one_of(st.none(), st.integers(-10, 2**70).map(str),
                            st.just(str(sum(map(len, body_chunks)))), st.text(max_size=6)))
    fail = draw(st.one_of(st.none(), st.tuples(st.integers(0, 6), failures)))
    status = draw(st.sampled_from([None, None, None, 404, 500]))
    right_md5 = draw(st.booleans())
    return body_chunks, length, fail, status, right_md5


def check_download(behaviour, tmp: Path) -> None:
    chunks, length, fail, status, right_md5 = behaviour
    body = b"".join(chunks)

    def urlopen(request, timeout=None):
        if status is not None:
            raise urllib.error.HTTPError(request.full_url, status, "Nope", {}, None)
        return _FakeResponse(chunks, length, fail)

    root = tmp / "deep" / "root"
    md5 = hashlib.md5(body).hexdigest() if right_md5 else "0" * 32
    real = data_mod.urllib.request.urlopen
    data_mod.urllib.request.urlopen = urlopen
    try:
        with bounded():
            got = _only(DownloadError, data_mod.download, "breastmnist", root=root,
                        base_url="http://fuzz.invalid", progress=False, md5=md5,
                        max_bytes=1 << 20)
    finally:
        data_mod.urllib.request.urlopen = real
    clean = status is None and fail is None and right_md5
    if got is not None:
        assert got.read_bytes() == body and clean
        assert [p.name for p in root.iterdir()] == ["breastmnist.npz"]
        got.unlink()
        for folder in (root, root.parent):
            folder.rmdir()
    else:
        assert not clean or _declared_too_big(length), "a clean download failed"
        assert not (tmp / "deep").exists()  # nothing left behind, not even the folders it made


@FUZZ
@given(server_behaviour())
def test_fuzz_download_file_handling(tmp_path, behaviour):
    check_download(behaviour, tmp_path)


def _declared_too_big(length) -> bool:
    try:
        return int(length) > 1 << 20
    except (TypeError, ValueError):
        return False


def test_download_of_an_endless_body_stops_at_max_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod.urllib.request, "urlopen",
                        lambda request, timeout=None: _Endless([], None, None))
    with bounded(), pytest.raises(DownloadError, match="more than the 4,194,304 bytes"):
        data_mod.download("breastmnist", root=tmp_path / "r", base_url="http://fuzz.invalid",
                          progress=False, max_bytes=4 << 20)
    assert not (tmp_path / "r").exists()


# --- a longer campaign: python tests/test_fuzz.py --seconds 600 -------------------------------

class _TimeUp(Exception):
    """Ends a campaign target's hypothesis run at its deadline."""


def _campaign_step(check, count: list, seen: list, deadline: float):
    import tempfile
    import time

    def run(value):
        if time.monotonic() > deadline:
            raise _TimeUp
        count[0] += 1
        with tempfile.TemporaryDirectory(prefix="cnnfast-fuzz-") as tmp:
            try:
                check(value, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a finding: record it, go on
                seen.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    return run


def _campaign(seconds: float) -> int:
    """Run each target for ``seconds / 3`` with fresh randomness; print executions and the
    distinct failures (findings). Returns how many distinct findings there were."""
    import time

    from hypothesis import Phase

    targets = [("checkpoint reader", checkpoint_bytes(), check_checkpoint),
               ("npz loader", npz_bytes(), check_npz),
               ("download", server_behaviour(), check_download)]
    findings = 0
    for name, strategy, check in targets:
        count, seen = [0], []
        deadline = time.monotonic() + seconds / len(targets)
        run = _campaign_step(check, count, seen, deadline)

        runner = settings(max_examples=10**9, deadline=None, database=None, derandomize=False,
                          phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))(given(strategy)(run))
        started = time.monotonic()
        while time.monotonic() < deadline:
            try:
                runner()
            except _TimeUp:
                break
        distinct = sorted(set(seen))
        findings += len(distinct)
        print(f"{name}: {count[0]} executions in {time.monotonic() - started:.0f} s, "
              f"{len(seen)} failing, {len(distinct)} distinct", flush=True)
        for line in distinct[:30]:
            print(f"    {line}", flush=True)
    return findings


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="cnnfast fuzzing campaign")
    parser.add_argument("--seconds", type=float, default=600)
    sys.exit(1 if _campaign(parser.parse_args().seconds) else 0)
