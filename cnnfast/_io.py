"""Atomic file writes: the one way cnnfast writes a file a user keeps.

:func:`atomic_write` writes to a temporary file in the target's folder, flushes and fsyncs it,
renames it over the target (``os.replace``, atomic on POSIX and Windows) and fsyncs the folder so
the rename itself survives a power cut. A crash or an exception inside the block leaves the old
file (or no file) under the real name and removes the temporary file: nothing is half-written.
Used by checkpoints, the training state, ``data.save_npz``, ``data.download``, the CLI's JSON
files, predictions and the benchmark report.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 suffix: str = ".tmp") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit make it ``path``.

    ``mode`` is ``"wb"`` (binary, the default) or ``"w"`` (text, ``encoding`` default UTF-8).
    The temporary file is ``.{name}.{random}{suffix}`` in ``path``'s folder, which must exist.
    Its ``.name`` is the temporary path, so the block may read back what it wrote (e.g. to
    verify a checksum) and raise to abandon the write. The file gets the permissions a plain
    ``open(path, "w")`` would give (``0o666`` less the umask).

        with atomic_write("report.json", "w") as f:
            json.dump(report, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    folder = path.parent
    text = mode == "w"
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:  # "x": create exclusively, with the permissions open() gives any new file
            f = (open(str(tmp), "x", encoding=encoding or "utf-8") if text
                 else open(str(tmp), "xb"))
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided; draw again
            continue
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
