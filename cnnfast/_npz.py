"""Reading ``.npz`` files without trusting them: sizes are checked before anything is allocated.

``numpy.load`` allocates each array from the shape its ``.npy`` header declares and only then
reads; a damaged or hostile file (a header declaring terabytes, a zip member that inflates far
beyond its compressed size) exhausts memory before the missing bytes are noticed. :func:`read_npz`
reads the zip directory and every member's ``.npy`` header first and refuses, with
:class:`NpzError`, before allocating:

* a file that is not a zip archive, or a member that is not a ``.npy`` array, is encrypted or
  uses a compression zipfile cannot read;
* an object (pickled) array, a structured or unusual dtype (only bool, integers, floats and
  fixed-width strings are read);
* a header whose shape * itemsize disagrees with the member's uncompressed size in the zip
  directory (the inflated stream is also cut at that size, so the two cannot diverge);
* a total uncompressed size above ``max_bytes`` (default: the machine's physical memory).

Then each member is streamed into its preallocated array; a stream that ends early, fails its
CRC or does not decompress is refused as well. Nothing else escapes: every failure is an
:class:`NpzError` (a ``ValueError``) whose message says what is wrong.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

_MAX_HEADER = 10_000  # bytes of .npy header text; numpy's own default limit
_MAX_MEMBERS = 1_000
_CHUNK = 1 << 20
_KINDS = "biufU"  # bool, signed, unsigned, float, unicode string


class NpzError(ValueError):
    """An ``.npz`` file that cannot be read safely; the message says why."""


def physical_memory() -> int:
    """Bytes of physical memory (a large fallback where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _header(member, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy_format.read_magic(member)
        if version == (1, 0):
            read = npy_format.read_array_header_1_0
        elif version in ((2, 0), (3, 0)):
            read = npy_format.read_array_header_2_0
        else:
            raise NpzError(f"{name}: unsupported .npy format version {version}")
        shape, fortran, dtype = read(member, max_header_size=_MAX_HEADER)
    except NpzError:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError, OSError, zipfile.BadZipFile,
            zlib.error, RecursionError, MemoryError) as exc:
        raise NpzError(f"{name}: not a readable .npy array ({type(exc).__name__}: "
                       f"{str(exc)[:200]})") from None
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise NpzError(f"{name}: invalid shape {shape!r} in the .npy header")
    if dtype.hasobject or dtype.kind not in _KINDS or dtype.fields is not None \
            or dtype.subdtype is not None:
        raise NpzError(f"{name}: dtype {dtype} is not allowed (only bool, integer, float and "
                       "string arrays; never pickled objects)")
    return shape, fortran, dtype


def _read_into(member, array: np.ndarray, name: str) -> None:
    view = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    done = 0
    while done < len(view):
        chunk = member.read(min(_CHUNK, len(view) - done))
        if not chunk:
            raise NpzError(f"{name}: the array data ends after {done} of {len(view)} bytes")
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
    if member.read(1):  # the directory's size and the header agree, so this is a damaged stream
        raise NpzError(f"{name}: data beyond the size its header declares")


def read_npz(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` by key (``name.npy`` -> ``name``).

    Raises :class:`NpzError` (see the module doc) for anything but a well-formed file whose
    arrays total at most ``max_bytes`` (default :func:`physical_memory`).
    """
    path = Path(path)
    limit = physical_memory() if max_bytes is None else int(max_bytes)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError,
            NotImplementedError, UnicodeDecodeError, IndexError, OverflowError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise NpzError(f"{path}: not a readable .npz file ({type(exc).__name__}: "
                       f"{str(exc)[:200]})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > _MAX_MEMBERS:
            raise NpzError(f"{path}: {len(infos)} members; an .npz of a dataset has a handful")
        total = sum(max(int(i.file_size), 0) for i in infos)
        if total > limit:
            raise NpzError(f"{path}: its members declare {total:,} bytes uncompressed, more than "
                           f"the {limit:,} allowed (memory)")
        arrays: dict[str, np.ndarray] = {}
        for info in infos:
            name = f"{path}: {info.filename}"
            if not info.filename.endswith(".npy") or info.is_dir():
                raise NpzError(f"{name}: not a .npy member; an .npz holds only .npy arrays")
            key = info.filename[:-4]
            if key in arrays:
                raise NpzError(f"{name}: the array {key!r} appears twice")
            try:
                with archive.open(info) as member:
                    shape, fortran, dtype = _header(member, name)
                    count = 1
                    for s in shape:
                        count *= s
                    nbytes = count * dtype.itemsize
                    header_bytes = member.tell() if member.seekable() else None
                    if header_bytes is not None and header_bytes + nbytes != info.file_size:
                        raise NpzError(f"{name}: its header declares shape {shape} of {dtype} "
                                       f"({nbytes:,} bytes) but the member holds "
                                       f"{info.file_size - header_bytes:,} bytes of data")
                    if nbytes > limit:
                        raise NpzError(f"{name}: shape {shape} of {dtype} needs {nbytes:,} "
                                       f"bytes, more than the {limit:,} allowed")
                    array = np.empty(shape[::-1] if fortran else shape, dtype)
                    _read_into(member, array, name)
            except NpzError:
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
                    NotImplementedError, RuntimeError, OverflowError, MemoryError) as exc:
                # RuntimeError: an encrypted member; NotImplementedError: a compression method
                raise NpzError(f"{name}: cannot be read ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None
            arrays[key] = array.T if fortran else array
    return arrays
