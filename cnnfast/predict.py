"""Prediction on new data with a checkpoint: ``cnnfast predict``'s inputs, batching and CSV.

Inputs (:func:`load_inputs`), each as raw images ``(N, C, *S)`` as the checkpoint's training data
stored them, plus one name per image:

* a ``.npz`` file (or a MedMNIST / synthetic name), one split of it: names are the indices;
* a folder of PNG/JPEG images (2D): converted to the checkpoint's channels (grey or RGB) and,
  when their size differs, resized to its image size (bilinear, with a warning); names are the
  file names;
* a folder of ``.npy`` volumes (3D) ``(D, H, W)`` or ``(C, D, H, W)``: resized (trilinear, with a
  warning) when their size differs; names are the file names;
* scans (a NIfTI or DICOM file, a DICOM series folder, or a folder of them: see
  :func:`cnnfast.scans.scan_items`), when the checkpoint records the preprocessing of
  ``cnnfast prepare``: each is read and preprocessed by that recipe; names are the file or
  folder names.

Files are taken in sorted name order. Anything unreadable or of the wrong shape raises
:class:`~cnnfast.dataset.DataError` naming the file.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cnnfast._io import atomic_write
from cnnfast.dataset import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Inputs:
    """Raw images ``(N, C, *S)``, one name per image, the true labels ``(N, L)`` when known."""

    images: np.ndarray
    names: list[str]
    labels: np.ndarray | None = None
    name_column: str = "index"


def _resize(images: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resize of the trailing axes (half-pixel centres), back to the input dtype."""
    from cnnfast.viz import resize_linear

    out = resize_linear(images, shape)
    if images.dtype == np.uint8:
        out = np.clip(np.rint(out), 0, 255)
    return out.astype(images.dtype)


def _load_image_folder(folder: Path, files: list[Path], channels: int,
                       image_shape: tuple[int, ...]) -> Inputs:
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise DataError(f"{folder}: the checkpoint takes {channels}-channel images; a folder of "
                        f"PNG/JPEG images gives 1 (grey) or 3 (RGB)")
    arrays, resized = [], set()
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                size = (img.height, img.width)
                if size != tuple(image_shape):
                    resized.add(size)
                    img = img.resize((image_shape[1], image_shape[0]), Image.BILINEAR)
                a = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f}: cannot read the image ({exc})") from None
        arrays.append(a[None] if channels == 1 else np.moveaxis(a, -1, 0))
    _warn_resized(folder, "images", resized, image_shape, "bilinear")
    return Inputs(np.stack(arrays), [f.name for f in files], name_column="file")


def _warn_resized(folder: Path, what: str, resized: set, image_shape: tuple[int, ...],
                  method: str) -> None:
    """One warning naming the sizes that were resized to the checkpoint's ``image_shape``."""
    if resized:
        sizes = ", ".join("x".join(map(str, s)) for s in sorted(resized))
        warnings.warn(f"{folder}: {what} of size {sizes} were resized to "
                      f"{'x'.join(map(str, image_shape))} ({method}), the size the checkpoint "
                      f"was trained on", stacklevel=4)


def _load_volume_folder(folder: Path, files: list[Path], channels: int,
                        image_shape: tuple[int, ...]) -> Inputs:
    arrays, resized, dtypes = [], set(), set()
    for f in files:
        try:
            a = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{f}: cannot read the volume ({exc})") from None
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[0] != channels or a.dtype.kind not in "uif":
            raise DataError(f"{f}: expected a numeric (D, H, W) or ({channels}, D, H, W) volume, "
                            f"got {a.dtype} array of shape {a.shape}")
        if a.shape[1:] != tuple(image_shape):
            resized.add(a.shape[1:])
            a = _resize(a, image_shape)
        arrays.append(a)
        dtypes.add(a.dtype)
    if len(dtypes) > 1:
        raise DataError(f"{folder}: the volumes mix dtypes {sorted(map(str, dtypes))}; use one")
    _warn_resized(folder, "volumes", resized, image_shape, "trilinear")
    return Inputs(np.stack(arrays), [f.name for f in files], name_column="file")


def _is_scan_input(path: Path) -> bool:
    from cnnfast.scans import DICOM_SUFFIX, is_nifti

    if path.is_file():
        return is_nifti(path) or path.suffix.lower() == DICOM_SUFFIX
    if not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy") for p in entries):
        return False  # a folder of PNG/JPEG images or .npy volumes, as before
    # a folder of scans, or a series folder (DICOM files often have no suffix)
    return any(p.is_dir() or is_nifti(p) or p.suffix.lower() in (DICOM_SUFFIX, "")
               for p in entries)


def _load_scans(path: Path, preprocessing: dict | None, channels: int,
                image_shape: tuple[int, ...]) -> Inputs:
    from cnnfast.scans import read_scan, scan_items
    from cnnfast.transforms import Preprocessing

    if preprocessing is None:
        raise DataError(f"{path}: scans (DICOM / NIfTI) need the preprocessing they were trained "
                        "with, and this checkpoint records none: train it on a `cnnfast "
                        "prepare` .npz")
    try:
        recipe = Preprocessing.from_dict(preprocessing)
    except (TypeError, ValueError) as exc:
        raise DataError(f"the checkpoint's preprocessing cannot be used: {exc}") from None
    if channels != 1 or recipe.size != image_shape:
        raise DataError(f"the checkpoint's preprocessing makes {recipe.size} images but its "
                        f"model takes ({channels}, {', '.join(map(str, image_shape))})")
    arrays, names = [], []
    for item in scan_items(path, recipe.spatial_dims):
        scan = read_scan(item)
        try:
            arrays.append(recipe.apply(scan.array, scan.spacing)[None])
        except ValueError as exc:
            raise DataError(f"{item}: {exc}") from None
        names.append(item.name)
    return Inputs(np.stack(arrays), names, name_column="scan")


def load_inputs(data: str | os.PathLike, split: str, channels: int,
                image_shape: Sequence[int], load_dataset: Callable | None = None,
                preprocessing: dict | None = None) -> Inputs:
    """The images to predict on (see the module docstring). ``channels`` and ``image_shape``
    ``(H, W)`` or ``(D, H, W)`` are what the checkpoint expects, ``preprocessing`` its recipe
    for scans; ``load_dataset(data)`` loads a ``.npz`` or a dataset name (default
    :func:`cnnfast.data.load_dataset`)."""
    image_shape = tuple(int(s) for s in image_shape)
    path = Path(data)
    if _is_scan_input(path):
        return _load_scans(path, preprocessing, channels, image_shape)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        volumes = [p for p in files if p.suffix.lower() == ".npy"]
        if images and volumes:
            raise DataError(f"{path}: holds both images and .npy volumes; use one kind per folder")
        if images:
            if len(image_shape) != 2:
                raise DataError(f"{path}: PNG/JPEG images are 2D but the checkpoint takes 3D "
                                f"volumes (give a folder of .npy volumes)")
            return _load_image_folder(path, images, channels, image_shape)
        if volumes:
            if len(image_shape) != 3:
                raise DataError(f"{path}: .npy volumes are for 3D checkpoints; this one takes "
                                f"2D images (give PNG/JPEG files or a .npz)")
            return _load_volume_folder(path, volumes, channels, image_shape)
        raise DataError(f"{path}: no PNG/JPEG images or .npy volumes in this folder")
    if load_dataset is None:
        from cnnfast.data import load_dataset
    dataset = load_dataset(data)
    part = dataset.split(split)
    if part.images.shape[1] != channels or part.images.shape[2:] != image_shape:
        raise DataError(f"{data}: {split} images have shape {part.images.shape[1:]} but the "
                        f"checkpoint takes ({channels}, {', '.join(map(str, image_shape))})")
    return Inputs(part.images, [str(i) for i in range(len(part))], part.labels)


def predict_probabilities(model, images: np.ndarray, normalization: Callable, task: str,
                          batch_size: int = 256, device: str = "cpu",
                          progress: bool = False) -> np.ndarray:
    """Class probabilities ``(N, K)`` (softmax; sigmoid for multi-label) for raw ``images``,
    in batches, in evaluation mode; a tqdm bar when ``progress`` and there are several batches."""
    from cnnfast.metrics import scores_from_logits
    from cnnfast.train import predict_logits

    starts = range(0, len(images), batch_size)
    if progress and len(starts) > 1:
        from tqdm import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", leave=False)
    out = [predict_logits(model, images[s:s + batch_size], normalization, batch_size, device)
           for s in starts]
    return scores_from_logits(np.concatenate(out), task)


def write_csv(path: str | os.PathLike, names: Sequence[str], probabilities: np.ndarray,
              label_names: Sequence[str], name_column: str = "index") -> Path:
    """A CSV with ``name_column`` then one probability column per label name, written
    atomically (:func:`cnnfast._io.atomic_write`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name_column, *label_names])
    for name, row in zip(names, probabilities):
        writer.writerow([name, *(f"{p:.6g}" for p in row)])
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(buffer.getvalue())
    return Path(path)


# --- a checkpoint's predictions and export ------------------------------------------------------

@dataclass
class PredictResult:
    """What :func:`predict_checkpoint` wrote: ``count`` rows, its ``labels`` columns, the
    heatmap PNGs."""

    count: int
    labels: list[str]
    heatmaps: list[Path]


def _image_spec(ckpt) -> tuple[int, tuple[int, ...]]:
    """(channels, image shape) a checkpoint's model was trained on, from its header."""
    from cnnfast.checkpoint import CheckpointError

    data = ckpt.header.get("data", {})
    if "image_shape" not in data:
        raise CheckpointError(f"{ckpt.path or 'checkpoint'}: its header records no image shape "
                              f"(data.image_shape), which this needs")
    channels = data.get("in_channels", ckpt.model_config.get("kwargs", {}).get("in_channels", 1))
    return int(channels), tuple(int(s) for s in data["image_shape"])


def predict_checkpoint(checkpoint, data: str | os.PathLike, out: str | os.PathLike,
                       split: str = "test", batch_size: int = 256, device: str = "cpu",
                       gradcam: str | os.PathLike | None = None, gradcam_max: int = 64,
                       progress: bool = False, load_dataset: Callable | None = None
                       ) -> PredictResult:
    """Write ``out``, a CSV of the probabilities a checkpoint (path or loaded) gives ``data``
    (see :func:`load_inputs`), and with ``gradcam`` a Grad-CAM PNG of the predicted class for
    each of the first ``gradcam_max`` inputs into that folder. Resizing warns
    (``warnings.warn``); bad input raises :class:`~cnnfast.dataset.DataError` or
    :class:`~cnnfast.checkpoint.CheckpointError` before anything is written."""
    from cnnfast.checkpoint import Checkpoint, load_checkpoint
    from cnnfast.dataset import MULTICLASS, Normalization
    from cnnfast.train import model_from_checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    channels, image_shape = _image_spec(ckpt)
    model = model_from_checkpoint(ckpt, device=device)
    inputs = load_inputs(data, split, channels, image_shape, load_dataset=load_dataset,
                         preprocessing=ckpt.header.get("preprocessing"))
    norm = (Normalization.from_dict(ckpt.normalization) if ckpt.normalization
            else Normalization.medmnist(len(image_shape), inputs.images.dtype))
    task = ckpt.task or MULTICLASS
    probabilities = predict_probabilities(model, inputs.images, norm, task, batch_size, device,
                                          progress)
    labels = ckpt.label_names or [f"class {i}" for i in range(probabilities.shape[1])]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, inputs.names, probabilities, labels, inputs.name_column)
    heatmaps = []
    if gradcam is not None:
        heatmaps = write_gradcams(model, inputs, norm, probabilities, labels, task,
                                  Path(gradcam), gradcam_max, batch_size, device)
    return PredictResult(len(inputs.names), list(labels), heatmaps)


def write_gradcams(model, inputs: Inputs, normalization: Callable, probabilities: np.ndarray,
                   labels: Sequence[str], task: str, folder: Path, limit: int,
                   batch_size: int = 256, device: str = "cpu") -> list[Path]:
    """``folder/gradcam_<name>.png`` for each of the first ``limit`` inputs: the Grad-CAM of the
    predicted class over the image (3D: its three middle slices), titled with the true label
    (when known) and the prediction."""
    import cnnfast
    from cnnfast import viz
    from cnnfast.dataset import MULTILABEL

    folder.mkdir(parents=True, exist_ok=True)
    count = min(len(inputs.names), limit)
    paths = []
    for start in range(0, count, batch_size):
        stop = min(count, start + batch_size)
        x = cnnfast.tensor(normalization(inputs.images[start:stop]), device=device)
        heat = viz.grad_cam(model, x)
        true = None if inputs.labels is None else inputs.labels[start:stop]
        titles = viz.gradcam_titles(true, probabilities[start:stop], labels, task == MULTILABEL,
                                    inputs.names[start:stop])
        for i in range(stop - start):
            stem = Path(inputs.names[start + i]).stem
            paths.append(viz.plot_gradcam(inputs.images[start + i:start + i + 1], heat[i:i + 1],
                                          folder / f"gradcam_{stem}.png", titles[i:i + 1],
                                          title="Grad-CAM of the predicted class"))
    return paths


def export_checkpoint(checkpoint, out: str | os.PathLike, opset: int = 17) -> Path:
    """Export a checkpoint (path or loaded) as ONNX with the normalisation, task, label names and
    image shape its header records (see :func:`cnnfast.export.export_onnx`)."""
    from cnnfast.checkpoint import Checkpoint, load_checkpoint
    from cnnfast.export import export_onnx
    from cnnfast.train import model_from_checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    channels, image_shape = _image_spec(ckpt)
    return export_onnx(model_from_checkpoint(ckpt), out, (channels, *image_shape),
                       normalization=ckpt.normalization, task=ckpt.task,
                       label_names=ckpt.label_names or None, opset=opset)
