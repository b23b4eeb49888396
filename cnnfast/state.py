"""Resumable training: the training-state file and the lock on a run's output folder.

``cnnfast train`` keeps, in its ``--out`` folder, a file :data:`STATE_NAME` holding everything a
killed training needs to continue and end with the same bits as a run never interrupted (on the
same machine and thread count: the fast CPU kernels' sums depend on how work is split):

* the weights and buffers, the optimizer's per-parameter state (moments, step counts, momentum
  buffers) and hyper-parameters, the schedule's epoch count;
* every random generator's state: the global one of :func:`cnnfast.manual_seed` (dropout without
  its own generator), the data loader's (order and augmentation) and any ``numpy.random.Generator``
  a module holds (``nn.Dropout(rng=...)``);
* where the training stands: epochs done, the current epoch's sample order and how many of its
  batches are done, the running loss sum; the best validation AUROC, its epoch and weights; the
  per-epoch history;
* a *signature* of what decides the result (model config, training config, a fingerprint of the
  data): a resume whose arguments differ in any of these is refused with the differences named.

The file is a checkpoint-format file (:mod:`cnnfast.checkpoint`: magic, JSON header, raw arrays,
SHA-256; no pickle) with ``"kind": "training-state"`` in its header, written to a temporary file
and renamed (:func:`write_state`), so a kill at any moment leaves the previous state or the new
one, never a broken file. It is written by one process and read by any number (data-parallel
ranks all call :func:`read_state`; rank 0 alone calls :func:`write_state`).

:class:`RunLock` makes a second training into the same folder fail while one runs: a lock file
(:data:`LOCK_NAME`) holding the owner's pid, locked with ``flock`` (released by the kernel when
the owner dies, so a lock file left by a killed run is taken over, not obeyed).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnfast._io import atomic_write
from cnnfast.checkpoint import CheckpointError, decode, encode

STATE_NAME = "training.state"
LOCK_NAME = "training.lock"
STATE_KIND = "training-state"
STATE_VERSION = 1


class TrainingStateError(ValueError):
    """A training state that cannot be used (damaged, another run's, a resume that differs)."""


class RunLockedError(TrainingStateError):
    """Another live process is training into the same output folder."""


# --- JSON with non-finite floats ------------------------------------------------------------------
# Histories hold NaN (an undefined AUROC) and the best AUROC starts at -inf; the checkpoint header
# is strict JSON, so non-finite floats travel as {"__float__": "nan"}.

def _to_json(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return _to_json(obj.item())
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


# --- the state ------------------------------------------------------------------------------------

@dataclass
class TrainingState:
    """Everything :func:`cnnfast.train.fit` needs to continue a run (see the module doc).

    ``epochs_done`` epochs are complete; when ``order`` is not ``None`` the next epoch has begun
    with that sample order and ``batches_done`` of its batches are done (their loss sum and count
    in ``loss_sum`` / ``seen``). ``global_step`` counts optimizer steps over the whole run.
    """

    signature: dict
    model: dict[str, np.ndarray]
    optimizer: dict
    schedule_epoch: int | None
    rng: dict
    epochs_done: int = 0
    batches_done: int = 0
    order: np.ndarray | None = None
    loss_sum: float = 0.0
    seen: int = 0
    global_step: int = 0
    best_epoch: int = 0
    best_val_auc: float = -math.inf
    best_state: dict[str, np.ndarray] | None = None
    history: list[dict] = field(default_factory=list)
    finished: bool = False


def _host(a) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array (the state file holds host arrays)."""
    get = getattr(a, "get", None)
    return np.array(get() if callable(get) and not isinstance(a, np.ndarray) else a, copy=True)


def encode_state(state: TrainingState) -> bytes:
    """The file bytes of ``state`` (checkpoint format, ``"kind": "training-state"``)."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in state.model.items():
        arrays[f"model/{name}"] = _host(value)
    if state.best_state is not None:
        for name, value in state.best_state.items():
            arrays[f"best/{name}"] = _host(value)
    optim_json = {"param_groups": state.optimizer["param_groups"], "state": {}}
    for index, entries in state.optimizer["state"].items():
        scalars = {}
        for key, value in entries.items():
            if isinstance(value, (int, float, bool, np.generic)):
                scalars[key] = value
            else:
                arrays[f"optim/{index}/{key}"] = _host(value)
        optim_json["state"][str(index)] = scalars
    if state.order is not None:
        arrays["order"] = np.asarray(state.order, np.int64)
    header = {
        "kind": STATE_KIND, "state_version": STATE_VERSION, "signature": state.signature,
        "optimizer": optim_json, "schedule_epoch": state.schedule_epoch, "rng": state.rng,
        "epochs_done": state.epochs_done, "batches_done": state.batches_done,
        "has_order": state.order is not None, "loss_sum": state.loss_sum, "seen": state.seen,
        "global_step": state.global_step, "best_epoch": state.best_epoch,
        "best_val_auc": state.best_val_auc, "has_best": state.best_state is not None,
        "history": state.history, "finished": state.finished,
    }
    try:
        return encode(arrays, _to_json(header))
    except CheckpointError as exc:
        raise TrainingStateError(f"cannot store the training state: {exc}") from None


def decode_state(raw: bytes, source: str = STATE_NAME) -> TrainingState:
    """Parse and verify state bytes; raise :class:`TrainingStateError` on any problem."""
    try:
        ckpt = decode(raw, source)
    except CheckpointError as exc:
        raise TrainingStateError(str(exc)) from None
    try:
        header = _from_json(ckpt.header)
    except (TypeError, ValueError, RecursionError):
        raise TrainingStateError(f"{source}: unreadable training-state header") from None
    if header.get("kind") != STATE_KIND:
        raise TrainingStateError(f"{source}: a checkpoint, not a training state")
    if header.get("state_version") != STATE_VERSION:
        raise TrainingStateError(f"{source}: training-state version "
                                 f"{header.get('state_version')!r} is not supported (this "
                                 f"cnnfast reads version {STATE_VERSION})")
    arrays = ckpt.state_dict
    try:
        groups: dict[str, dict] = {"model": {}, "best": {}}
        optim_state: dict[int, dict] = {int(i): dict(v) for i, v in
                                        header["optimizer"]["state"].items()}
        for name, value in arrays.items():
            prefix, _, rest = name.partition("/")
            if prefix in groups:
                groups[prefix][rest] = value
            elif prefix == "optim":
                index, _, key = rest.partition("/")
                optim_state.setdefault(int(index), {})[key] = value
            elif name != "order":
                raise TrainingStateError(f"{source}: unexpected array {name!r}")
        return TrainingState(
            signature=header["signature"], model=groups["model"],
            optimizer={"param_groups": header["optimizer"]["param_groups"],
                       "state": optim_state},
            schedule_epoch=header["schedule_epoch"], rng=header["rng"],
            epochs_done=int(header["epochs_done"]), batches_done=int(header["batches_done"]),
            order=arrays["order"] if header["has_order"] else None,
            loss_sum=float(header["loss_sum"]), seen=int(header["seen"]),
            global_step=int(header["global_step"]), best_epoch=int(header["best_epoch"]),
            best_val_auc=float(header["best_val_auc"]),
            best_state=groups["best"] if header["has_best"] else None,
            history=list(header["history"]), finished=bool(header["finished"]))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        if isinstance(exc, TrainingStateError):
            raise
        raise TrainingStateError(f"{source}: incomplete training state "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None


def write_state(path: str | os.PathLike, state: TrainingState) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`cnnfast._io.atomic_write`: temporary
    file, fsync, rename, folder fsync)."""
    path = Path(path)
    data = encode_state(state)
    with atomic_write(path) as f:
        f.write(data)
    return path


def read_state(path: str | os.PathLike) -> TrainingState:
    """Read and verify a training-state file; raise :class:`TrainingStateError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrainingStateError(f"no training state at {path}") from None
    except OSError as exc:
        raise TrainingStateError(f"{path}: cannot read the training state "
                                 f"({exc.strerror})") from None
    return decode_state(raw, str(path))


# --- random generators ----------------------------------------------------------------------------

def module_generators(model) -> dict[str, np.random.Generator]:
    """The ``numpy.random.Generator`` objects a model's modules hold, by ``module.attribute``
    (one entry per distinct generator: a generator shared by several layers is saved once)."""
    found: dict[str, np.random.Generator] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, np.random.Generator) and id(value) not in seen:
                seen.add(id(value))
                found[f"{prefix}.{attr}" if prefix else attr] = value
    return found


def generator_state(gen: np.random.Generator) -> dict:
    return gen.bit_generator.state


def set_generator_state(gen: np.random.Generator, state: dict, what: str) -> None:
    try:
        gen.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise TrainingStateError(f"cannot restore the random generator {what}: {exc}") from None


# --- what a resume must match ---------------------------------------------------------------------

def data_fingerprint(dataset) -> dict:
    """What identifies a dataset for a resume: name, task, label names, split shapes, and a
    SHA-256 over every split's images and labels (the same file under another path matches)."""
    digest = hashlib.sha256()
    shapes = {}
    for name in ("train", "val", "test"):
        split = dataset.split(name)
        for array in (split.images, split.labels):
            array = np.ascontiguousarray(array)
            digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            digest.update(memoryview(array).cast("B"))
        shapes[name] = list(split.images.shape)
    return {"task": dataset.task, "label_names": list(dataset.label_names),
            "shapes": shapes, "sha256": digest.hexdigest(),
            "normalization": dataset.normalization.to_dict()}


def signature(model, dataset, config) -> dict:
    """What decides a run's bits: model config, training config and data fingerprint."""
    return _to_json({"model": model.config, "train": config.to_dict(),
                     "data": data_fingerprint(dataset)})


_FLAGS = {"batch_size": "--batch-size", "weight_decay": "--weight-decay",
          "flip_axes": "--flip", "eval_batch_size": "eval batch size"}


def _flag(section: str, key: str) -> str:
    if section == "data":
        return "--data" if key == "sha256" else f"--data ({key.replace('_', ' ')})"
    if section == "model" and key == "name":
        return "--model"
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def signature_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two signatures (empty when they match)."""
    out = []
    for section in ("model", "train", "data"):
        a, b = dict(saved.get(section, {})), dict(current.get(section, {}))
        if section == "model":  # {"name": ..., "kwargs": {...}}: compare the kwargs flat
            a = {"name": a.get("name"), **a.get("kwargs", {})}
            b = {"name": b.get("name"), **b.get("kwargs", {})}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                if key == "sha256":
                    out.append("--data: the images or labels differ from the saved run's")
                else:
                    out.append(f"{_flag(section, key)}: {b.get(key)!r} here, "
                               f"{a.get(key)!r} in the saved run")
    return out


def check_resumable(state: TrainingState, current_signature: dict, where: str) -> None:
    """Refuse (:class:`TrainingStateError`) a state whose signature differs from this run's."""
    diffs = signature_differences(state.signature, current_signature)
    if diffs:
        raise TrainingStateError(f"cannot resume the training in {where}: the arguments differ "
                                 "from the saved run's: " + "; ".join(diffs)
                                 + " (give the same arguments, or another --out)")


# --- the run lock ---------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on an output folder for the life of one training (context manager).

    The lock file holds the owner's pid. It is ``flock``-ed while held, so a second training
    finds it locked and is refused with :class:`RunLockedError` naming the pid; the kernel drops
    the lock when its owner dies, so a file left by a killed run is stale: it is taken over and
    :attr:`stale_pid` says whose it was. Where ``flock`` is missing (not POSIX) a live pid in the
    file is what counts.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.stale_pid: int | None = None
        self._fd: int | None = None

    def _read_pid(self) -> int | None:
        try:
            text = self.path.read_text().strip()
            return int(text.split()[0]) if text else None
        except (OSError, ValueError, IndexError):
            return None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        pid = self._read_pid()
                        raise RunLockedError(
                            f"{self.path.parent} is in use by another training (pid "
                            f"{pid if pid is not None else 'unknown'}, lock file {self.path}); "
                            "wait for it to end or choose another --out") from None
                    # The holder may have removed the file between our open and our lock:
                    # then we locked an orphan; start again on the current file.
                    try:
                        if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                            os.close(fd)
                            continue
                    except FileNotFoundError:
                        os.close(fd)
                        continue
                old = self._read_pid()
                if fcntl is None and old is not None and old != os.getpid() and _pid_alive(old):
                    raise RunLockedError(f"{self.path.parent} is in use by another training "
                                         f"(pid {old}, lock file {self.path})")
                if old is not None and old != os.getpid():
                    self.stale_pid = old
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Unlink while still holding the lock; a waiter that opened the old file notices the
            # inode change above and retries.
            if self._read_pid() == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_OUR_TEMPORARY = re.compile(r"\.(training\.state|metrics\.json|.+\.ckpt|.+\.png)\.[0-9a-f]+\.tmp")


def remove_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed training left in ``folder``: those
    :func:`cnnfast._io.atomic_write` names ``.NAME.RANDOM.tmp`` for the files a training writes
    (state, checkpoints, metrics, plots; nothing else of the folder's). Call it only while
    holding the folder's :class:`RunLock`. Returns what was removed."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if _OUR_TEMPORARY.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
