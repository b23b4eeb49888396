"""Checks every dataset passes at load, before any training: pixels, splits, labels and task.

* images: a supported dtype (uint8 and other integers, float32/float64), no empty split, finite
  pixels (a NaN or infinite pixel is named by split and index: it would otherwise surface as a
  diverged loss);
* labels fit the task. A known MedMNIST name (or a task stored in the file, or given) fixes the
  task and the label count; otherwise the task is read from the labels, strictly: one column of
  0/1 is binary; one column of other values must be the classes 0..K-1 with every one of them
  present in the training split (a binary file with one stray label 7 is an error, not an
  8-class problem with five empty classes) unless ``num_classes`` K says how many there are;
  several columns are multi-label 0/1. Any failure raises :class:`DataError` listing the values
  found.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cnnfast.dataset import BINARY, MULTICLASS, MULTILABEL, SPLITS, DataError

_CHUNK = 4096  # images per finiteness check (bounded temporary memory)


def _values(labels: np.ndarray, limit: int = 20) -> str:
    found = np.unique(labels)
    text = ", ".join(str(v) for v in found[:limit].tolist())
    return text + (f", ... ({len(found)} distinct)" if len(found) > limit else "")


def check_images(images: np.ndarray, split: str, source: str) -> None:
    """Refuse an unsupported dtype, an empty split, and non-finite pixels (naming the first
    image index that holds one)."""
    if images.dtype.kind not in "uif" or images.dtype == np.float16:
        raise DataError(f"{source}: {split}_images has dtype {images.dtype}; expected uint8 (or "
                        "another integer type) or float32/float64")
    if images.ndim < 3:
        raise DataError(f"{source}: {split}_images: expected images N x H x W (x 3) or "
                        f"N x D x H x W, got rank {images.ndim} shape {images.shape}")
    if len(images) == 0:
        raise DataError(f"{source}: the {split} split is empty (0 images); every split needs at "
                        "least one")
    if images.dtype.kind != "f":
        return
    first, count = None, 0
    for start in range(0, len(images), _CHUNK):
        block = images[start:start + _CHUNK]
        bad = np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))
        if len(bad) and first is None:
            first = start + int(bad[0])
        count += len(bad)
    if first is not None:
        pixels = np.asarray(images[first]).ravel()
        kinds = " and ".join(k for k, hit in (("NaN", np.isnan(pixels).any()),
                                              ("infinite", np.isinf(pixels).any())) if hit)
        raise DataError(f"{source}: {split}_images[{first}] has {kinds} pixel values ({count} "
                        f"image(s) of the {split} split do); clean or drop them before training")


def resolve_task(labels: Mapping[str, np.ndarray], task: str | None,
                 label_names: Sequence[str] | None, num_classes: int | None, source: str
                 ) -> tuple[str, list[str]]:
    """The task and label names of a dataset with ``labels`` (split -> ``(N, L)``).

    ``task``/``label_names`` come from the caller, the file or the MedMNIST registry when known;
    ``num_classes`` (``--num-classes``) gives the class count of a single-column file. Without a
    task the rules of the module doc apply. Range checks of each split follow in
    :func:`cnnfast.data.check_labels`.
    """
    train = labels["train"]
    columns = {s: lab.shape[1] for s, lab in labels.items()}
    if len(set(columns.values())) != 1:
        raise DataError(f"{source}: the splits' labels have different numbers of columns: "
                        f"{columns}")
    every = np.concatenate([labels[s].reshape(-1) for s in SPLITS])
    if every.dtype.kind == "f":
        if not np.all(np.isfinite(every)):
            raise DataError(f"{source}: labels hold non-finite values (found: {_values(every)})")
        if np.any(every != np.round(every)):
            raise DataError(f"{source}: expected integer labels, got non-integer floats (values "
                            f"found: {_values(every)})")
    if num_classes is not None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise DataError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if train.shape[1] != 1:
            raise DataError(f"{source}: --num-classes applies to one label column, but the "
                            f"labels have {train.shape[1]} (a multi-label file)")
        if task == MULTILABEL:
            raise DataError(f"{source}: --num-classes {num_classes} does not apply to a "
                            "multi-label task")
        if label_names is not None and len(label_names) != num_classes:
            raise DataError(f"{source}: --num-classes {num_classes} but the dataset names "
                            f"{len(label_names)} classes ({', '.join(map(str, label_names))})")
    if task is None:
        if train.shape[1] > 1:
            task = MULTILABEL
        elif num_classes is not None:
            task = BINARY if num_classes == 2 else MULTICLASS
        else:
            task = _infer_single_column(labels, source)
    if label_names is None:
        if task == MULTILABEL:
            count = train.shape[1]
        elif task == BINARY:
            count = 2
        elif num_classes is not None:
            count = int(num_classes)
        else:
            count = int(every.max()) + 1 if every.size else 0
            _require_all_classes(labels, count, source)
        label_names = [str(i) for i in range(count)]
    return task, [str(n) for n in label_names]


def _infer_single_column(labels: Mapping[str, np.ndarray], source: str) -> str:
    every = np.concatenate([labels[s].reshape(-1) for s in SPLITS])
    found = set(np.unique(every).tolist())
    if found <= {0, 1}:
        return BINARY
    return MULTICLASS


def _require_all_classes(labels: Mapping[str, np.ndarray], count: int, source: str) -> None:
    """Classes 0..count-1 inferred from the labels: every one must occur in train."""
    every = np.concatenate([labels[s].reshape(-1) for s in SPLITS])
    if every.size and every.min() < 0:
        raise DataError(f"{source}: label {every.min()} out of range: labels must be binary 0/1 "
                        f"or classes 0..K-1 (values found: {_values(every)})")
    present = set(np.unique(labels["train"]).astype(np.int64).tolist())
    missing = [k for k in range(count) if k not in present]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DataError(
            f"{source}: the labels hold the values {_values(every)} (train: "
            f"{_values(labels['train'])}): not binary 0/1, and as classes 0..{count - 1} the "
            f"classes {shown} never occur in train. A binary file must hold only 0 and 1; for "
            f"a multi-class one with classes absent from train, pass --num-classes K "
            "(num_classes=K), or store 'task' and 'label_names' in the file")

