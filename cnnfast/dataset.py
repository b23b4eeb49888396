"""Dataset types shared by loading, synthetic data, training and metrics: a leaf module.

A dataset is three splits (train / val / test) of images, channels first, plus a task:

=========================  ==========================  ======================================
task                       labels ``(N, L)`` int64     model output and loss
=========================  ==========================  ======================================
``"binary-class"``         ``L == 1``, values 0 or 1   2 logits, softmax + cross-entropy
``"multi-class"``          ``L == 1``, values 0..K-1   K logits, softmax + cross-entropy
``"multi-label, binary-    ``L`` labels, each 0 or 1   L logits, sigmoid + BCE per label
class"``
=========================  ==========================  ======================================

The task strings are MedMNIST's own (``medmnist.INFO[name]["task"]``); ``"ordinal-regression"``
(RetinaMNIST) is trained and scored as multi-class, as the MedMNIST benchmark does.

Images are ``(N, C, H, W)`` for 2D and ``(N, C, D, H, W)`` for 3D, kept in the file's dtype
(``uint8`` for MedMNIST) until a batch is drawn; :class:`Normalization` turns a batch into float32
the way MedMNIST's reference training does (``ToTensor`` then ``Normalize(0.5, 0.5)`` for 2D,
``x / 255`` for 3D).

This module imports NumPy only, so :mod:`cnnfast.data` (files, downloads, loaders),
:mod:`cnnfast.synthetic` and :mod:`cnnfast.metrics` can all build on it without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BINARY = "binary-class"
MULTICLASS = "multi-class"
MULTILABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASKS = (BINARY, MULTICLASS, MULTILABEL, ORDINAL)
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data file or dataset name that cannot be used; the message says what and why."""



# --- containers -----------------------------------------------------------------------------------

@dataclass
class Split:
    """One split: ``images`` ``(N, C, H, W)`` or ``(N, C, D, H, W)``; ``labels`` ``(N, L)``
    int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class MedicalDataset:
    """Train / val / test splits with the task they are labelled for.

    ``label_names`` has one entry per class (binary and multi-class) or per label (multi-label).
    ``normalization`` says how to turn a batch of raw images into the model's float32 input.
    ``preprocessing`` is the recipe that made the images from scans
    (:class:`cnnfast.transforms.Preprocessing` as a dict; ``cnnfast prepare``), or None.
    """

    train: Split
    val: Split
    test: Split
    task: str
    label_names: list[str]
    name: str = "dataset"
    normalization: "Normalization" = field(default=None)  # type: ignore[assignment]
    synthetic: bool = False
    preprocessing: dict | None = None

    def __post_init__(self) -> None:
        if self.normalization is None:
            self.normalization = Normalization.medmnist(self.spatial_dims, self.train.images.dtype)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    @property
    def spatial_dims(self) -> int:
        return self.train.images.ndim - 2

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The spatial shape ``(H, W)`` or ``(D, H, W)``."""
        return tuple(int(s) for s in self.train.images.shape[2:])

    @property
    def num_outputs(self) -> int:
        """How many logits a model needs: classes (binary: 2) or labels (multi-label)."""
        return len(self.label_names)

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(self.split(s))}" for s in SPLITS)
        shape = "x".join(str(s) for s in self.image_shape)
        kind = " (synthetic)" if self.synthetic else ""
        return (f"{self.name}{kind}: {self.task}, {self.num_outputs} "
                f"{'labels' if self.task == MULTILABEL else 'classes'}, "
                f"{self.in_channels} x {shape} images; {sizes}")


@dataclass(frozen=True)
class Normalization:
    """``x -> (x * scale - mean) / std``, per batch, in float32 (``mean``/``std`` scalars)."""

    scale: float = 1.0 / 255.0
    mean: float = 0.5
    std: float = 0.5

    @classmethod
    def medmnist(cls, spatial_dims: int, dtype=np.uint8) -> "Normalization":
        """MedMNIST's reference recipe: 2D ``(x/255 - 0.5) / 0.5``; 3D ``x/255``.

        Float images are taken to be in ``[0, 1]`` already (no division by 255).
        """
        scale = 1.0 / 255.0 if np.dtype(dtype) == np.uint8 else 1.0
        if spatial_dims == 3:
            return cls(scale, 0.0, 1.0)
        return cls(scale, 0.5, 0.5)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) * np.float32(self.scale)
        return (x - np.float32(self.mean)) / np.float32(self.std)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(float(d["scale"]), float(d["mean"]), float(d["std"]))
