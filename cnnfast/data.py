"""Medical image datasets: MedMNIST v2 ``.npz`` files, their download, and a batch ``DataLoader``.

The dataset types (task constants, :class:`Split`, :class:`MedicalDataset`,
:class:`Normalization`, :class:`DataError`) live in :mod:`cnnfast.dataset` and are re-exported
here; see that module for the tasks and the image layout.

MedMNIST files hold ``train_images``, ``val_images``, ``test_images`` and the matching ``_labels``
arrays: 2D grey ``N x H x W``, 2D RGB ``N x H x W x 3``, 3D ``N x D x H x W``, labels ``N x L``.
Files written by :func:`save_npz` may also hold ``task``, ``label_names`` and ``preprocessing``
(the JSON recipe of ``cnnfast prepare``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cnnfast import config, datacheck
from cnnfast._io import atomic_write
from cnnfast._npz import NpzError, read_npz
from cnnfast.dataset import (  # noqa: F401 - re-exported: data.py was their home before
    BINARY,
    MULTICLASS,
    MULTILABEL,
    ORDINAL,
    SPLITS,
    TASKS,
    DataError,
    MedicalDataset,
    Normalization,
    Split,
)


class DownloadError(RuntimeError):
    """A download that failed (offline, HTTP error, wrong checksum); the message says what to do."""


# --- the MedMNIST registry ----------------------------------------------------------------------
# URLs and MD5 sums are those of the ``medmnist`` package (medmnist/info.py, v3.0.2), which point
# at the MedMNIST+ Zenodo record 10519652 (sizes 28, 64, 128, 224; 3D sets have 28 and 64 only).

MEDMNIST_URL = "https://zenodo.org/records/10519652/files"
MAX_DOWNLOAD_BYTES = 32 << 30  # above the largest MedMNIST+ file (a few GB); stops endless bodies
_ORGAN_LABELS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                 "liver", "lung-left", "lung-right", "pancreas", "spleen")


@dataclass(frozen=True)
class MedMNISTInfo:
    """What the MedMNIST record says about one dataset."""

    name: str
    task: str
    n_channels: int
    spatial_dims: int
    label_names: tuple[str, ...]
    md5: dict[int, str]  # image size -> MD5 of ``{name}.npz`` / ``{name}_{size}.npz``

    def filename(self, size: int = 28) -> str:
        return f"{self.name}.npz" if size == 28 else f"{self.name}_{size}.npz"

    def url(self, size: int = 28, base_url: str | None = None) -> str:
        return f"{(base_url or MEDMNIST_URL).rstrip('/')}/{self.filename(size)}?download=1"


def _info(name, task, n_channels, spatial_dims, labels, md5s):
    sizes = (28, 64, 128, 224) if spatial_dims == 2 else (28, 64)
    return name, MedMNISTInfo(name, task, n_channels, spatial_dims, tuple(labels),
                              dict(zip(sizes, md5s)))


MEDMNIST: dict[str, MedMNISTInfo] = dict([
    _info("pathmnist", MULTICLASS, 3, 2,
          ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
           "normal colon mucosa", "cancer-associated stroma",
           "colorectal adenocarcinoma epithelium"),
          ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
           "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    _info("chestmnist", MULTILABEL, 1, 2,
          ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
           "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
           "pleural", "hernia"),
          ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
           "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    _info("dermamnist", MULTICLASS, 3, 2,
          ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
           "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
           "vascular lesions"),
          ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
           "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d")),
    _info("octmnist", MULTICLASS, 1, 2,
          ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
          ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
           "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    _info("pneumoniamnist", BINARY, 1, 2, ("normal", "pneumonia"),
          ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
           "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    _info("retinamnist", ORDINAL, 3, 2, ("0", "1", "2", "3", "4"),
          ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
           "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    _info("breastmnist", BINARY, 1, 2, ("malignant", "normal, benign"),
          ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
           "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    _info("bloodmnist", MULTICLASS, 3, 2,
          ("basophil", "eosinophil", "erythroblast",
           "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
           "monocyte", "neutrophil", "platelet"),
          ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
           "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    _info("tissuemnist", MULTICLASS, 1, 2,
          ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
           "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
           "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
          ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
           "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
    _info("organamnist", MULTICLASS, 1, 2, _ORGAN_LABELS,
          ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
           "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    _info("organcmnist", MULTICLASS, 1, 2, _ORGAN_LABELS,
          ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
           "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    _info("organsmnist", MULTICLASS, 1, 2, _ORGAN_LABELS,
          ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
           "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
    _info("organmnist3d", MULTICLASS, 1, 3,
          ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder",
           "heart", "lung-right", "lung-left", "spleen", "pancreas"),
          ("a0c5a1ff56af4f155c46d46fbb45a2fe", "58a2205adf14a9d0a189cb06dc78bf10")),
    _info("nodulemnist3d", BINARY, 1, 3, ("benign", "malignant"),
          ("8755a7e9e05a4d9ce80a24c3e7a256f3", "c47c5b7d457bf6332200d2ea6d64ecd8")),
    _info("adrenalmnist3d", BINARY, 1, 3, ("normal", "hyperplasia"),
          ("bbd3c5a5576322bc4cdfea780653b1ce", "17721accfe9fb005146a47d33bc54b2f")),
    _info("fracturemnist3d", MULTICLASS, 1, 3,
          ("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
          ("6aa7b0143a6b42da40027a9dda61302f", "f01d7e6316aedf4210da0da5b7437b42")),
    _info("vesselmnist3d", BINARY, 1, 3, ("vessel", "aneurysm"),
          ("b41fd4f7e7e2feedddb201585ecafa1b", "6bb274a8846e1097066dcd64e2c4520f")),
    _info("synapsemnist3d", BINARY, 1, 3, ("inhibitory synapse", "excitatory synapse"),
          ("1235b78a3cd6280881dd7850a78eadb6", "43bd14ebf3af9d3dd072446fedc14d5e")),
])


# --- loading and validation ---------------------------------------------------------------------

def channels_first(images: np.ndarray, spatial_dims: int | None = None, what: str = "images"
                   ) -> np.ndarray:
    """MedMNIST layout -> ``(N, C, *S)``.

    ``N x H x W`` -> ``(N, 1, H, W)``; ``N x H x W x 3`` -> ``(N, 3, H, W)`` (RGB);
    ``N x D x H x W`` -> ``(N, 1, D, H, W)``. A rank-4 array whose last axis is 3 is read as 2D
    RGB unless ``spatial_dims=3`` says otherwise.
    """
    if images.ndim == 3 and spatial_dims in (None, 2):
        return images[:, None]
    if images.ndim == 4:
        rgb = images.shape[-1] == 3 if spatial_dims is None else spatial_dims == 2
        if rgb:
            if images.shape[-1] not in (1, 3):
                raise DataError(f"{what}: a 2D array N x H x W x C needs C of 1 or 3, got shape "
                                f"{images.shape}")
            return np.ascontiguousarray(np.moveaxis(images, -1, 1))
        return images[:, None]
    expected = {None: "N x H x W, N x H x W x 3 or N x D x H x W", 2: "N x H x W or N x H x W x 3",
                3: "N x D x H x W"}[spatial_dims]
    raise DataError(f"{what}: expected images of shape {expected}, got rank {images.ndim} "
                    f"shape {images.shape}")


def check_labels(labels: np.ndarray, task: str, n_outputs: int, what: str = "labels"
                 ) -> np.ndarray:
    """Validate and return labels as ``(N, L)`` int64 for ``task`` with ``n_outputs`` classes or
    labels; raise :class:`DataError` naming the bad value otherwise."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise DataError(f"{what}: expected shape N x L, got {labels.shape}")
    if labels.dtype.kind == "f":
        if labels.size and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
            raise DataError(f"{what}: expected integer labels, got non-integer floats")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{what}: expected integer labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if task == MULTILABEL:
        if labels.shape[1] != n_outputs:
            raise DataError(f"{what}: a multi-label task with {n_outputs} labels needs N x "
                            f"{n_outputs} labels, got {labels.shape}")
        top = 1
    else:
        if labels.shape[1] != 1:
            raise DataError(f"{what}: a {task} task needs N x 1 labels, got {labels.shape}")
        top = n_outputs - 1
    if labels.size and (labels.min() < 0 or labels.max() > top):
        bad = labels[(labels < 0) | (labels > top)][0]
        found = np.unique(labels)
        shown = ", ".join(str(v) for v in found[:20].tolist()) + (", ..." if len(found) > 20
                                                                   else "")
        raise DataError(f"{what}: label {bad} out of range: {task} labels must lie in "
                        f"0..{top} (values found: {shown})")
    return labels


def from_arrays(arrays: dict[str, np.ndarray], task: str | None = None,
                label_names: Sequence[str] | None = None, name: str = "dataset",
                spatial_dims: int | None = None, source: str = "arrays",
                normalization: Normalization | None = None, synthetic: bool = False,
                num_classes: int | None = None) -> MedicalDataset:
    """Build a checked :class:`MedicalDataset` from MedMNIST-style arrays.

    ``arrays`` holds ``{split}_images`` (MedMNIST layout, see :func:`channels_first`) and
    ``{split}_labels`` (``N x L``) for the three splits. ``task`` and ``label_names`` are inferred
    from the labels when not given, strictly (:mod:`cnnfast.datacheck`: binary 0/1, or classes
    0..K-1 all present in train unless ``num_classes`` K is given). Images must be non-empty,
    finite and of a supported dtype; any failure raises :class:`DataError`.
    """

    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")
               if f"{s}_{k}" not in arrays]
    if missing:
        raise DataError(f"{source}: missing key(s) {', '.join(missing)}; a MedMNIST .npz holds "
                        "train_images, train_labels, val_images, val_labels, test_images, "
                        "test_labels")
    images = {}
    for s in SPLITS:
        img = np.asarray(arrays[f"{s}_images"])
        datacheck.check_images(img, s, source)
        images[s] = channels_first(img, spatial_dims, what=f"{source}: {s}_images")
        lab = np.asarray(arrays[f"{s}_labels"])
        if lab.ndim not in (1, 2) or lab.dtype.kind not in "biuf":
            raise DataError(f"{source}: {s}_labels must be N x L numbers, got shape {lab.shape} "
                            f"of dtype {lab.dtype}")
        n_labels = len(lab)
        if len(images[s]) != n_labels:
            raise DataError(f"{source}: {s}_images has {len(images[s])} images but {s}_labels has "
                            f"{n_labels} labels")
    shapes = {s: images[s].shape[1:] for s in SPLITS}
    if len(set(shapes.values())) != 1:
        raise DataError(f"{source}: the splits' image shapes differ: {shapes}")
    raw_labels = []
    for s in SPLITS:
        lab = np.asarray(arrays[f"{s}_labels"])
        raw_labels.append(lab[:, None] if lab.ndim == 1 else lab)
    if any(lab.ndim != 2 for lab in raw_labels):
        raise DataError(f"{source}: labels must be N x L, got shapes "
                        f"{[lab.shape for lab in raw_labels]}")
    if task is not None and task not in TASKS:
        raise DataError(f"{source}: task must be one of {TASKS}, got {task!r}")
    task, label_names = datacheck.resolve_task(dict(zip(SPLITS, raw_labels)), task, label_names,
                                               num_classes, source)
    if task == BINARY and len(label_names) != 2:
        raise DataError(f"{source}: a binary task needs 2 label names, got {len(label_names)}")
    labels = {s: check_labels(lab, task, len(label_names), what=f"{source}: {s}_labels")
              for s, lab in zip(SPLITS, raw_labels)}
    splits = {s: Split(images[s], labels[s]) for s in SPLITS}
    return MedicalDataset(splits["train"], splits["val"], splits["test"], task=task,
                          label_names=label_names, name=name, normalization=normalization,
                          synthetic=synthetic)


def load_npz(path: str | os.PathLike, task: str | None = None,
             label_names: Sequence[str] | None = None, spatial_dims: int | None = None,
             num_classes: int | None = None, max_bytes: int | None = None) -> MedicalDataset:
    """Load a MedMNIST-style ``.npz`` into channels-first splits.

    The task and label names come, in order of preference, from the arguments, from ``task`` /
    ``label_names`` arrays stored in the file, from the MedMNIST registry when the file name is a
    MedMNIST name (``pneumoniamnist.npz``, ``nodulemnist3d_64.npz``), or from the labels.
    ``num_classes`` gives the class count of a single-column file whose task is not known.
    Raises :class:`DataError` (a ``ValueError``) for a missing or malformed file; the file is
    read by :func:`cnnfast._npz.read_npz`, which checks every declared size against the file and
    ``max_bytes`` (default: physical memory) before allocating.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        arrays = read_npz(path, max_bytes=max_bytes)
    except NpzError as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    stem = re.sub(r"_(64|128|224)$", "", path.stem.lower())
    info = MEDMNIST.get(stem)
    if task is None and "task" in arrays:
        task = str(arrays["task"])
    if label_names is None and "label_names" in arrays:
        if arrays["label_names"].ndim != 1:
            raise DataError(f"{path}: label_names must be a list of names, got shape "
                            f"{arrays['label_names'].shape}")
        label_names = [str(n) for n in arrays["label_names"]]
    if info is not None:
        task = task or info.task
        label_names = label_names or info.label_names
        spatial_dims = spatial_dims or info.spatial_dims
    dataset = from_arrays(arrays, task=task, label_names=label_names, name=path.stem,
                          spatial_dims=spatial_dims, source=str(path), num_classes=num_classes)
    if "preprocessing" in arrays:
        try:
            dataset.preprocessing = json.loads(str(arrays["preprocessing"]))
        except ValueError:
            raise DataError(f"{path}: its preprocessing entry is not JSON") from None
        if not isinstance(dataset.preprocessing, dict):
            raise DataError(f"{path}: its preprocessing entry is not a JSON object")
    return dataset


def save_npz(path: str | os.PathLike, dataset: MedicalDataset) -> Path:
    """Write ``dataset`` as a MedMNIST-layout ``.npz`` (plus ``task`` and ``label_names``).

    Channels-first images go back to MedMNIST's layout (grey: channel axis dropped, RGB:
    channels last), so :func:`load_npz` reads the file back to the same arrays.
    """
    arrays = {}
    for s in SPLITS:
        split = dataset.split(s)
        img = split.images
        if img.shape[1] == 1:
            img = img[:, 0]
        else:
            img = np.moveaxis(img, 1, -1)
        arrays[f"{s}_images"] = img
        arrays[f"{s}_labels"] = split.labels
    arrays["task"] = np.array(dataset.task)
    arrays["label_names"] = np.array(dataset.label_names)
    if dataset.preprocessing is not None:
        arrays["preprocessing"] = np.array(json.dumps(dataset.preprocessing, sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)
    return path


# --- download -----------------------------------------------------------------------------------

def default_root() -> Path:
    """Where downloads go: ``$CNNFAST_DATA_DIR`` or ``~/.medmnist`` (shared with ``medmnist``)."""
    return config.data_dir()


def parse_name(name: str, size: int | None = None) -> tuple[MedMNISTInfo, int]:
    """``"pneumoniamnist"`` / ``"pneumoniamnist_64"`` (+ optional ``size``) -> (info, size)."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:_(28|64|128|224))?", name.lower())
    info = MEDMNIST.get(m.group(1)) if m else None
    if info is None:
        raise DataError(f"unknown dataset {name!r}: not a file, and not one of the MedMNIST "
                        f"datasets ({', '.join(MEDMNIST)}) or the synthetic ones "
                        "(synthetic-nodule2d, synthetic-nodule3d, synthetic-chestxray)")
    named = int(m.group(2)) if m.group(2) else None
    if named and size and named != size:
        raise DataError(f"dataset {name!r} names size {named} but size={size} was asked for")
    size = named or size or 28
    if size not in info.md5:
        raise DataError(f"{info.name} comes in sizes {sorted(info.md5)}, not {size}")
    return info, size


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, size: int | None = None, root: str | os.PathLike | None = None,
             base_url: str | None = None, progress: bool = True, timeout: float = 30.0,
             md5: str | None = None, max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
    """Download a MedMNIST ``.npz`` by dataset name (``"pneumoniamnist"``, size 28/64/128/224).

    The file goes to ``root`` (default :func:`default_root`) through a temporary file that is
    renamed only once its MD5 matches the MedMNIST record. An existing file is returned as is.
    ``base_url`` (or ``$CNNFAST_MEDMNIST_URL``) replaces the Zenodo record URL, e.g. for a mirror;
    ``md5`` overrides the expected checksum. A response larger than ``max_bytes`` (declared or
    streamed) is abandoned. Raises :class:`DownloadError` when offline, on an HTTP error, a
    broken connection, an oversized response or a checksum mismatch; nothing is left behind.
    """
    info, size = parse_name(name, size)
    root = Path(root) if root is not None else default_root()
    target = root / info.filename(size)
    if target.is_file():
        return target
    base_url = base_url or config.get("medmnist_url")
    url = info.url(size, base_url)
    expected = md5 or info.md5[size]
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        with atomic_write(target, suffix=".part") as tmp:
            _fetch(url, tmp, progress=progress, timeout=timeout, desc=target.name,
                   max_bytes=max_bytes)
            tmp.flush()
            got = md5sum(tmp.name)
            if got != expected:  # raising inside the block keeps nothing under either name
                raise DownloadError(f"downloaded {target.name} from {url} has MD5 {got}, "
                                    f"expected {expected}: the file is damaged or not the "
                                    "MedMNIST release; nothing was kept")
        ok = True
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"could not download {target.name} from {url}: the server answered "
                            f"HTTP {exc.code} {exc.reason}; check the dataset name and size, or "
                            "--base-url") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(
            f"could not download {target.name} from {url}: {reason}. If this machine is offline, "
            f"fetch the file elsewhere (MD5 {expected}) and put it at {target}, or pass its "
            "path: --data /path/to/file.npz") from None
    finally:
        if not ok:  # leave no empty directories behind either
            for directory in created:
                with contextlib.suppress(OSError):
                    directory.rmdir()
    return target


def _fetch(url: str, out, progress: bool, timeout: float, desc: str, max_bytes: int) -> None:
    """Stream ``url`` into the open binary file ``out`` with a tqdm bar; refuse a response that
    says, or turns out, to be larger than ``max_bytes``."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "cnnfast"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        try:  # a missing or malformed Content-Length only costs the bar its total
            total = int(response.headers.get("Content-Length"))
        except (TypeError, ValueError):
            total = None
        total = total if total is not None and total >= 0 else None
        if total is not None and total > max_bytes:
            raise DownloadError(f"{url} announces {total:,} bytes, more than the {max_bytes:,} "
                                "bytes allowed; nothing was kept")
        done = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=not progress, leave=False) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                done += len(block)
                if done > max_bytes:
                    raise DownloadError(f"{url} sent more than the {max_bytes:,} bytes allowed; "
                                        "nothing was kept")
                out.write(block)
                bar.update(len(block))


def load_dataset(spec: str | os.PathLike, size: int | None = None,
                 root: str | os.PathLike | None = None, download_missing: bool = True,
                 base_url: str | None = None, progress: bool = True, seed: int = 0,
                 num_classes: int | None = None) -> MedicalDataset:
    """A dataset from a ``.npz`` path, a MedMNIST name, or a synthetic name.

    ``spec`` is a path to an existing file (or any name ending in ``.npz``); a MedMNIST name such
    as ``"pneumoniamnist"`` or ``"nodulemnist3d_64"`` (looked up in ``root``, downloaded when
    missing and ``download_missing``); or ``"synthetic-nodule2d"``, ``"synthetic-nodule3d"``,
    ``"synthetic-chestxray"`` (generated from ``seed``, see :mod:`cnnfast.synthetic`).
    ``num_classes`` is passed to :func:`load_npz`.
    """
    text = str(spec)
    if text.startswith("synthetic"):
        if num_classes is not None:
            raise DataError(f"num_classes does not apply to the built-in {text}")
        from cnnfast import synthetic

        return synthetic.load(text, seed=seed, size=size)
    if text.endswith(".npz") or os.sep in text or Path(text).exists():
        return load_npz(text, num_classes=num_classes)
    info, size = parse_name(text, size)
    path = (Path(root) if root is not None else default_root()) / info.filename(size)
    if not path.is_file():
        if not download_missing:
            raise DataError(f"{path} not found; download it with download({info.name!r}, "
                            f"size={size})")
        path = download(info.name, size, root=root, base_url=base_url, progress=progress)
    return load_npz(path, num_classes=num_classes)


# --- batches ------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class DataLoader:
    """Batches of ``(x, y)`` NumPy arrays from a :class:`Split` (or ``(images, labels)``).

    ``x`` is ``(B, C, *S)`` float32 after ``normalization`` and then ``transform(x, rng)``;
    ``y`` is the ``(B, L)`` int64 labels. With ``shuffle=True`` each pass draws a new order from
    one Generator seeded by ``seed``, so the sequence of epochs is the same for the same seed.
    The same Generator drives the random transforms.
    """

    def __init__(self, data: Split | tuple[np.ndarray, np.ndarray], batch_size: int = 128,
                 shuffle: bool = False, seed: int | None = 0, drop_last: bool = False,
                 normalization: Normalization | Callable | None = None,
                 transform: Transform | None = None) -> None:
        if isinstance(data, Split):
            images, labels = data.images, data.labels
        else:
            images, labels = data
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.normalization = normalization
        self.transform = transform
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = self.epoch_order()
        for i in range(len(self)):
            yield self.batch(order, i)

    def epoch_order(self) -> np.ndarray:
        """The sample order of the next pass (drawn from ``rng`` when shuffling)."""
        n = len(self.images)
        return self.rng.permutation(n) if self.shuffle else np.arange(n)

    def batch(self, order: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``i`` of the pass with sample ``order`` (random transforms draw from ``rng``).

        Iterating is ``order = epoch_order()`` then ``batch(order, i)`` for each ``i``; a
        resumed training continues a pass from its saved order, batch index and ``rng`` state.
        """
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        if self.shuffle:
            idx = np.sort(idx)  # sorted gathers are faster; the batch content is unchanged
        x = self.images[idx]
        x = self.normalization(x) if self.normalization is not None else x.astype(np.float32)
        if self.transform is not None:
            x = self.transform(x, self.rng)
        return np.ascontiguousarray(x, dtype=np.float32), self.labels[idx]
