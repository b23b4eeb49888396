"""Checkpoint files: weights plus a JSON header in one file, no pickle, written atomically.

Layout (all integers little-endian)::

    offset  size  content
    0       8     magic b"CNNFCKPT"
    8       4     format version, uint32 (currently 1)
    12      8     header length H in bytes, uint64
    20      H     header: UTF-8 JSON object (see below)
    20+H    P     tensor payload: each tensor's raw bytes, C order, little-endian, back to back
    20+H+P  32    SHA-256 of every byte before it

The header holds ``"tensors"``: a list of ``{"name", "dtype", "shape", "offset", "nbytes"}``
(offsets into the payload) and ``"payload_nbytes"`` P, plus whatever the caller stores: the model
config (``{"name": ..., "kwargs": {...}}``), task, label names, normalisation, metrics, and the
library version and creation time, which :func:`save_checkpoint` adds.

:func:`save_checkpoint` writes through :func:`cnnfast._io.atomic_write` (a temporary file in
the target directory, fsynced, renamed over the target, then the directory fsynced), so a crash
never leaves a half-written checkpoint under the real name.
:func:`load_checkpoint` checks, before returning anything, the magic, the version, that the file
is exactly as long as its header says (else: truncated, or trailing data) and the SHA-256 (else:
corrupted); any failure raises :class:`CheckpointError` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from cnnfast._io import atomic_write

MAGIC = b"CNNFCKPT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_BYTES = 32
_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message says which and why."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state_dict`` (name -> NumPy array) and the JSON ``header``."""

    state_dict: "OrderedDict[str, np.ndarray]"
    header: dict
    path: Path | None = None

    @property
    def model_config(self) -> dict:
        return self.header.get("model", {})

    @property
    def task(self) -> str | None:
        return self.header.get("task")

    @property
    def label_names(self) -> list[str]:
        return list(self.header.get("label_names", []))

    @property
    def normalization(self) -> dict | None:
        return self.header.get("normalization")

    @property
    def metrics(self) -> dict:
        return self.header.get("metrics", {})


def _library_version() -> str:
    try:
        import cnnfast

        return str(cnnfast.__version__)
    except (ImportError, AttributeError):
        return "unknown"


def encode(state_dict: Mapping[str, np.ndarray], meta: Mapping | None = None) -> bytes:
    """The checkpoint bytes for ``state_dict`` (name -> array) and JSON-serialisable ``meta``."""
    tensors, blobs, offset = [], [], 0
    for name, value in state_dict.items():
        arr = np.asarray(value)
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            arr = value.numpy()
        if arr.dtype.name not in _DTYPES:
            raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored "
                                  f"(supported: {', '.join(_DTYPES)})")
        blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        tensors.append({"name": str(name), "dtype": arr.dtype.name, "shape": list(arr.shape),
                        "offset": offset, "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = dict(meta or {})
    header.update({"format": "cnnfast-checkpoint", "tensors": tensors, "payload_nbytes": offset})
    try:
        header_bytes = json.dumps(header, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {exc}") from None
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def decode(raw: bytes, source: str = "checkpoint") -> Checkpoint:
    """Parse and verify checkpoint bytes (see the module doc); raise :class:`CheckpointError`."""
    if len(raw) < _PREFIX.size:
        if MAGIC.startswith(raw[:8]) and raw:
            raise CheckpointError(f"{source}: truncated checkpoint ({len(raw)} bytes)")
        raise CheckpointError(f"{source}: not a cnnfast checkpoint (file too small)")
    magic, version, header_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"{source}: not a cnnfast checkpoint (bad magic bytes {magic!r})")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format version {version} is not supported "
                              f"(this cnnfast reads version {FORMAT_VERSION})")
    header_end = _PREFIX.size + header_len
    if header_end + _DIGEST_BYTES > len(raw):
        _raise_damaged(raw, source, f"header says {header_len} header bytes but the file has "
                       f"{len(raw)} bytes in all")
    try:
        header = json.loads(raw[_PREFIX.size:header_end].decode("utf-8"))
        payload_nbytes = header["payload_nbytes"]
        tensors = header["tensors"]
        if not _is_count(payload_nbytes) or not isinstance(tensors, list):
            raise TypeError("payload_nbytes and tensors")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
            RecursionError):  # RecursionError: a deeply nested header
        _raise_damaged(raw, source, "unreadable header")
    expected = header_end + payload_nbytes + _DIGEST_BYTES
    if len(raw) < expected:
        raise CheckpointError(f"{source}: truncated checkpoint: {len(raw)} bytes, its header "
                              f"says {expected}")
    if len(raw) > expected:
        raise CheckpointError(f"{source}: {len(raw) - expected} bytes of trailing data after the "
                              "checkpoint: the file is damaged")
    digest = hashlib.sha256(raw[:-_DIGEST_BYTES]).digest()
    if digest != raw[-_DIGEST_BYTES:]:
        raise CheckpointError(f"{source}: corrupted checkpoint: SHA-256 checksum mismatch")
    state = OrderedDict()
    payload = memoryview(raw)[header_end:header_end + payload_nbytes]
    for t in tensors:
        name, dtype, shape, offset, nbytes = _tensor_entry(t, payload_nbytes, source)
        if name in state:
            raise CheckpointError(f"{source}: tensor {name!r} appears twice")
        arr = np.frombuffer(payload, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        state[name] = arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)
    return Checkpoint(state, header)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(t, payload_nbytes: int, source: str):
    """Validate one header entry (checksummed, but written by anyone): name, dtype, shape,
    offset and size must be well-formed and lie inside the payload before anything is read."""
    if not isinstance(t, dict) or not isinstance(t.get("name"), str):
        raise CheckpointError(f"{source}: invalid tensor entry in the header: {str(t)[:80]}")
    name = t["name"]
    if t.get("dtype") not in _DTYPES:
        raise CheckpointError(f"{source}: tensor {name!r} has dtype {str(t.get('dtype'))[:40]}; "
                              f"a checkpoint holds {', '.join(_DTYPES)}")
    shape, offset, nbytes = t.get("shape"), t.get("offset"), t.get("nbytes")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape) \
            or not _is_count(offset) or not _is_count(nbytes):
        raise CheckpointError(f"{source}: tensor {name!r} has an invalid shape, offset or size "
                              f"({str(shape)[:40]}, {str(offset)[:20]}, {str(nbytes)[:20]})")
    dtype = np.dtype(t["dtype"]).newbyteorder("<")
    count = 1
    for s in shape:
        count *= s
    if count * dtype.itemsize != nbytes or offset + nbytes > payload_nbytes:
        raise CheckpointError(f"{source}: tensor {name!r} does not fit the payload")
    return name, dtype, tuple(shape), offset, nbytes


def _raise_damaged(raw: bytes, source: str, what: str):
    # A header that runs past the end, or that does not parse, is either a truncated or a
    # corrupted file; a file ending in its own checksum is intact, so the damage is corruption.
    if hashlib.sha256(raw[:-_DIGEST_BYTES]).digest() == raw[-_DIGEST_BYTES:]:
        raise CheckpointError(f"{source}: invalid checkpoint header ({what})")
    raise CheckpointError(f"{source}: truncated or corrupted checkpoint ({what})")


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                    meta: Mapping | None = None) -> Path:
    """Write ``state_dict`` and ``meta`` (JSON-serialisable; e.g. ``model``, ``task``,
    ``label_names``, ``normalization``, ``metrics``) to ``path`` atomically. Returns the path.

    ``library_version`` and ``created_utc`` are added to the header unless ``meta`` has them.
    """
    path = Path(path)
    header = {"library_version": _library_version(),
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    header.update(meta or {})
    data = encode(state_dict, header)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint file; raise :class:`CheckpointError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    ckpt = decode(raw, str(path))
    ckpt.path = path
    return ckpt
