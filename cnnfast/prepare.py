"""``cnnfast prepare``'s work: a folder of scans plus ``labels.csv`` -> a MedMNIST-layout ``.npz``.

``labels.csv`` has a header row and one row per scan:

* an id column (``id``, ``file``, ``series``, ``scan`` or ``path``; else the first column): the
  scan's path relative to the folder, a DICOM series folder, a ``.nii``/``.nii.gz`` file or a
  DICOM image file (the suffix may be left out);
* optionally ``patient`` (or ``patient_id``, ``subject``): rows of one patient all go to the same
  split; and ``split`` (``train``/``val``/``test``) to fix a row's split;
* the label columns (all the others unless named): one column of 0/1 (binary), of class numbers
  0..K-1 or of class names (multi-class; two names make a binary task), or several 0/1 columns
  (multi-label).

Each scan is read (:func:`cnnfast.scans.read_scan`) and preprocessed by the recipe
(:class:`cnnfast.transforms.Preprocessing`); the splits are drawn from ``seed`` over patients
(or scans). The ``.npz`` holds float32 images (MedMNIST layout), labels, task, label names and
the recipe (key ``preprocessing``, JSON), so ``train`` records the recipe in its checkpoint and
``predict`` repeats it on new scans. A JSON manifest beside it (``<out>.json``) records the
recipe and each item's source, split, labels and original shape, spacing and orientation.
Nothing is written until every scan has been read: a bad row or file raises
:class:`~cnnfast.dataset.DataError` naming it; both files are written atomically.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cnnfast._io import atomic_write
from cnnfast.dataset import BINARY, MULTICLASS, MULTILABEL, SPLITS, DataError, MedicalDataset
from cnnfast.transforms import Preprocessing

ID_COLUMNS = ("id", "file", "series", "scan", "path")
PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "subject")
SPLIT_COLUMN = "split"
TASK_NAMES = {"binary": BINARY, "multiclass": MULTICLASS, "multilabel": MULTILABEL}
_SUFFIXES = ("", ".nii.gz", ".nii", ".dcm")


@dataclass
class Row:
    """One labelled scan of ``labels.csv`` (``line`` counts the header as line 1)."""

    line: int
    id: str
    path: Path
    patient: str | None
    split: str | None
    labels: list[str]


@dataclass
class Prepared:
    """What :func:`prepare` wrote: the dataset, the ``.npz`` and the manifest."""

    dataset: MedicalDataset
    npz: Path
    manifest: Path


def _find_column(header: list[str], given: str | None, candidates: Sequence[str], what: str,
                 csv_path: Path) -> str | None:
    if given is not None:
        if given not in header:
            raise DataError(f"{csv_path}: no {what} column {given!r} (columns: "
                            f"{', '.join(header)})")
        return given
    lower = {h.lower(): h for h in header}
    return next((lower[c] for c in candidates if c in lower), None)


def _scan_path(folder: Path, scan_id: str) -> Path | None:
    for suffix in _SUFFIXES:
        path = folder / f"{scan_id}{suffix}"
        if path.exists():
            return path
    return None


def read_labels(csv_path: str | os.PathLike, folder: str | os.PathLike,
                id_column: str | None = None, patient_column: str | None = None,
                label_columns: Sequence[str] | None = None) -> tuple[list[Row], list[str]]:
    """The rows of ``labels.csv`` and the label column names (see the module doc)."""
    csv_path, folder = Path(csv_path), Path(folder)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read the labels ({exc})") from None
    table = [r for r in table if any(cell.strip() for cell in r)]
    if len(table) < 2:
        raise DataError(f"{csv_path}: needs a header row and one row per scan")
    header = [h.strip() for h in table[0]]
    if len(set(header)) != len(header) or "" in header:
        raise DataError(f"{csv_path}: the header has empty or repeated column names: {header}")
    id_col = _find_column(header, id_column, ID_COLUMNS, "id", csv_path) or header[0]
    patient_col = _find_column(header, patient_column, PATIENT_COLUMNS, "patient", csv_path)
    split_col = _find_column(header, None, (SPLIT_COLUMN,), "split", csv_path)
    if label_columns is None:
        label_columns = [h for h in header if h not in (id_col, patient_col, split_col)]
    else:
        label_columns = list(label_columns)
        for c in label_columns:
            _find_column(header, c, (), "label", csv_path)
    if not label_columns:
        raise DataError(f"{csv_path}: no label column (columns: {', '.join(header)})")
    where = {h: i for i, h in enumerate(header)}
    rows, seen = [], {}
    for line, cells in enumerate(table[1:], start=2):
        if len(cells) != len(header):
            raise DataError(f"{csv_path} line {line}: {len(cells)} cells, the header has "
                            f"{len(header)}")
        cells = [c.strip() for c in cells]
        scan_id = cells[where[id_col]]
        if not scan_id:
            raise DataError(f"{csv_path} line {line}: empty {id_col}")
        if scan_id in seen:
            raise DataError(f"{csv_path} line {line}: {scan_id!r} is listed again (line "
                            f"{seen[scan_id]})")
        seen[scan_id] = line
        path = _scan_path(folder, scan_id)
        if path is None:
            raise DataError(f"{csv_path} line {line}: no scan {scan_id!r} in {folder} (a series "
                            "folder, a .nii/.nii.gz file or a DICOM file)")
        split = (cells[where[split_col]].lower() or None) if split_col else None
        if split is not None and split not in SPLITS:
            raise DataError(f"{csv_path} line {line}: split must be train, val or test, got "
                            f"{cells[where[split_col]]!r}")
        patient = cells[where[patient_col]] if patient_col else None
        rows.append(Row(line, scan_id, path, patient or None, split,
                        [cells[where[c]] for c in label_columns]))
    return rows, label_columns


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def encode_labels(rows: list[Row], columns: list[str], task: str | None, csv_path: Path
                  ) -> tuple[np.ndarray, str, list[str]]:
    """Labels ``(N, L)`` int64, the task and the label names from the CSV's text cells."""
    task = TASK_NAMES.get(task, task)
    if task is not None and task not in (BINARY, MULTICLASS, MULTILABEL):
        raise DataError(f"task must be one of {', '.join(TASK_NAMES)}, got {task!r}")
    cells = [r.labels for r in rows]
    if len(columns) > 1 or task == MULTILABEL:
        if task not in (None, MULTILABEL):
            raise DataError(f"{csv_path}: {len(columns)} label columns ({', '.join(columns)}) "
                            f"make a multi-label task, not {task!r}")
        for r in rows:
            for c, v in zip(columns, r.labels):
                if v not in ("0", "1"):
                    raise DataError(f"{csv_path} line {r.line}: {c} must be 0 or 1 in a "
                                    f"multi-label file, got {v!r}")
        return np.array(cells, dtype=np.int64), MULTILABEL, list(columns)
    column = columns[0]
    values = [c[0] for c in cells]
    if all(_is_int(v) for v in values):
        labels = np.array([int(v) for v in values], dtype=np.int64)[:, None]
        if labels.min() < 0:
            r = rows[int(np.argmin(labels))]
            raise DataError(f"{csv_path} line {r.line}: {column} is {r.labels[0]}; classes are "
                            "0..K-1")
        count = max(int(labels.max()) + 1, 2)
        task = task or (BINARY if count == 2 else MULTICLASS)
        return labels, task, [f"{column}={k}" for k in range(count)]
    for r, v in zip(rows, values):
        if not v:
            raise DataError(f"{csv_path} line {r.line}: empty {column}")
    names = sorted(set(values))
    if len(names) < 2:
        raise DataError(f"{csv_path}: {column} holds one class only ({names[0]!r})")
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[v] for v in values], dtype=np.int64)[:, None]
    return labels, task or (BINARY if len(names) == 2 else MULTICLASS), names


def assign_splits(rows: list[Row], val: float, test: float, seed: int,
                  csv_path: Path) -> list[str]:
    """One split per row: fixed ones kept, the others drawn over patients (each patient's rows
    stay together), with at least one group in val and test when their fraction is > 0."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"val and test fractions must be in [0, 1) with val + test < 1, got "
                        f"{val}, {test}")
    groups: dict[str, list[int]] = {}
    fixed: dict[str, str] = {}
    for i, r in enumerate(rows):
        key = f"patient:{r.patient}" if r.patient is not None else f"row:{i}"
        groups.setdefault(key, []).append(i)
        if r.split is not None:
            if fixed.setdefault(key, r.split) != r.split:
                raise DataError(f"{csv_path} line {r.line}: patient {r.patient} is put in "
                                f"{r.split} but an earlier row of that patient in "
                                f"{fixed[key]}: a patient belongs to one split")
    free = [k for k in groups if k not in fixed]
    order = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]
    n = len(order)
    n_test = max(int(round(test * n)), 1 if test > 0 and n >= 3 else 0)
    n_val = max(int(round(val * n)), 1 if val > 0 and n >= 3 else 0)
    chosen = dict(fixed)
    for k, key in enumerate(order):
        chosen[key] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    out = [""] * len(rows)
    for key, members in groups.items():
        for i in members:
            out[i] = chosen[key]
    return out


def prepare(folder: str | os.PathLike, out: str | os.PathLike, recipe: Preprocessing,
            labels: str | os.PathLike | None = None, task: str | None = None,
            id_column: str | None = None, patient_column: str | None = None,
            label_columns: Sequence[str] | None = None, val: float = 0.15, test: float = 0.15,
            seed: int = 0, progress: bool = False) -> Prepared:
    """Read, preprocess and split the scans ``labels`` (default ``folder/labels.csv``) lists,
    then write ``out`` (``.npz``) and its manifest ``out`` with suffix ``.json``; see the
    module doc. ``task`` is ``"binary"``, ``"multiclass"`` or ``"multilabel"`` (default:
    from the labels)."""
    from tqdm.auto import tqdm

    from cnnfast import scans
    from cnnfast.data import from_arrays, save_npz

    folder, out = Path(folder), Path(out)
    if not isinstance(recipe, Preprocessing):
        raise TypeError(f"recipe must be a Preprocessing, got {type(recipe).__name__}")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of scans")
    if out.suffix != ".npz":
        raise DataError(f"out must name a .npz file, got {out}")
    csv_path = Path(labels) if labels is not None else folder / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no labels file (one row per scan: id, labels...)")
    rows, columns = read_labels(csv_path, folder, id_column, patient_column, label_columns)
    label_array, task, label_names = encode_labels(rows, columns, task, csv_path)
    splits = assign_splits(rows, val, test, seed, csv_path)
    images, items = [], []
    for r, split, y in tqdm(list(zip(rows, splits, label_array)), desc="prepare", unit="scan",
                            disable=not progress, leave=False):
        try:
            scan = scans.read_scan(r.path)
            images.append(recipe.apply(scan.array, scan.spacing))
        except ValueError as exc:  # ScanError, or a recipe that does not fit the scan
            raise DataError(f"{csv_path} line {r.line} ({r.id}): {exc}") from None
        items.append({"id": r.id, "source": str(r.path.relative_to(folder)), "split": split,
                      "patient": r.patient, "labels": y.tolist(), "kind": scan.kind,
                      "shape": list(scan.array.shape),
                      "spacing": [round(s, 6) for s in scan.spacing], **scan.info})
    arrays = {}
    for s in SPLITS:
        idx = [i for i, split in enumerate(splits) if split == s]
        if not idx:
            raise DataError(f"{csv_path}: no scan in the {s} split ({len(rows)} scans, "
                            f"{len({r.patient for r in rows})} patients); add scans or set "
                            "the val/test fractions")
        arrays[f"{s}_images"] = np.stack([images[i] for i in idx])
        arrays[f"{s}_labels"] = label_array[idx]
    num_classes = len(label_names) if task == MULTICLASS else None
    dataset = from_arrays(arrays, task=task, label_names=label_names, name=out.stem,
                          spatial_dims=recipe.spatial_dims, source=str(csv_path),
                          num_classes=num_classes)
    dataset.preprocessing = recipe.to_dict()
    manifest = {"format": "cnnfast-prepare", "version": 1,
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "folder": str(folder), "labels": str(csv_path), "task": task,
                "label_names": label_names, "seed": seed, "val": val, "test": test,
                "preprocessing": recipe.to_dict(),
                "counts": {s: len(dataset.split(s)) for s in SPLITS}, "items": items}
    manifest_path = out.with_suffix(".json")
    save_npz(out, dataset)
    try:
        with atomic_write(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)
    except BaseException:
        out.unlink(missing_ok=True)  # no .npz without its manifest
        raise
    return Prepared(dataset, out, manifest_path)
