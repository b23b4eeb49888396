"""Image transforms on NumPy batches ``(N, C, *S)`` (2D ``S = (H, W)``, 3D ``S = (D, H, W)``).

Deterministic transforms (:func:`center_crop`, :func:`resize`, :func:`normalize`) are plain
functions; random ones take a NumPy Generator. The classes wrap them as callables
``t(x, rng) -> x`` for :class:`cnnfast.data.DataLoader`'s ``transform`` argument, and
:class:`Compose` chains them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _spatial(x: np.ndarray) -> int:
    if x.ndim not in (4, 5):
        raise ValueError(f"x: expected a batch (N, C, H, W) or (N, C, D, H, W), got shape "
                         f"{x.shape}")
    return x.ndim - 2


def _size_tuple(size: int | Sequence[int], nd: int, what: str) -> tuple[int, ...]:
    size = (size,) * nd if isinstance(size, (int, np.integer)) else tuple(size)
    if len(size) != nd or any(int(s) < 1 for s in size):
        raise ValueError(f"{what} must be a positive int or {nd} positive ints, got {size}")
    return tuple(int(s) for s in size)


def center_crop(x: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """The central ``size`` window of each image: ``(N, C, *S) -> (N, C, *size)``.

    Where ``S - size`` is odd the extra pixel is cut from the end (like torchvision).
    """
    nd = _spatial(x)
    size = _size_tuple(size, nd, "size")
    if any(s > full for s, full in zip(size, x.shape[2:])):
        raise ValueError(f"crop size {size} is larger than the images {x.shape[2:]}")
    slices = [slice(None), slice(None)]
    for s, full in zip(size, x.shape[2:]):
        start = int(round((full - s) / 2.0))
        slices.append(slice(start, start + s))
    return x[tuple(slices)]


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weight of hi for linear resampling, half-pixel centres
    (``align_corners=False``)."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize(x: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Linear (bi-/trilinear) resampling to ``size``: ``(N, C, *S) -> (N, C, *size)`` float32.

    Pixel centres are aligned as in ``torch.nn.functional.interpolate(align_corners=False)``,
    applied one axis at a time. No antialiasing: shrink by more than 2x in steps.
    """
    nd = _spatial(x)
    size = _size_tuple(size, nd, "size")
    out = x.astype(np.float32)
    for axis, n_out in zip(range(2, 2 + nd), size):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        lo, hi, w = _linear_weights(n_in, n_out)
        shape = [1] * out.ndim
        shape[axis] = n_out
        w = w.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


def normalize(x: np.ndarray, mean: float | Sequence[float] = 0.5,
              std: float | Sequence[float] = 0.5, scale: float = 1.0 / 255.0) -> np.ndarray:
    """``(x * scale - mean) / std`` in float32; ``mean``/``std`` scalars or one per channel.

    The defaults are MedMNIST's 2D recipe (``ToTensor()`` then ``Normalize([.5], [.5])``) on
    ``uint8`` images, mapping 0..255 to -1..1.
    """
    nd = _spatial(x)
    shape = (1, -1) + (1,) * nd
    mean = np.asarray(mean, dtype=np.float32).reshape(shape)
    std = np.asarray(std, dtype=np.float32).reshape(shape)
    if np.any(std == 0):
        raise ValueError("std must be non-zero")
    return (x.astype(np.float32) * np.float32(scale) - mean) / std


def random_flip(x: np.ndarray, rng: np.random.Generator, axes: Sequence[int] | None = None,
                p: float = 0.5) -> np.ndarray:
    """Flip each image independently with probability ``p`` along each of ``axes``.

    ``axes`` count spatial axes from 0 (2D: 0 = H, 1 = W; 3D: 0 = D, 1 = H, 2 = W); the default
    is the last spatial axis (a left-right flip). Returns a new array.
    """
    nd = _spatial(x)
    axes = (nd - 1,) if axes is None else tuple(axes)
    if any(a < 0 or a >= nd for a in axes):
        raise ValueError(f"axes must lie in 0..{nd - 1} for {nd}D images, got {axes}")
    out = x.copy()
    for a in axes:
        flip = rng.random(len(x)) < p
        if flip.any():
            out[flip] = np.flip(out[flip], axis=2 + a)
    return out


class CenterCrop:
    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return center_crop(x, self.size)


class Resize:
    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return resize(x, self.size)


class Normalize:
    def __init__(self, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
                 scale: float = 1.0 / 255.0) -> None:
        self.mean, self.std, self.scale = mean, std, scale

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return normalize(x, self.mean, self.std, self.scale)


class RandomFlip:
    def __init__(self, axes: Sequence[int] | None = None, p: float = 0.5) -> None:
        self.axes, self.p = axes, p

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return random_flip(x, rng, self.axes, self.p)


class Compose:
    """Apply transforms in order: ``Compose([CenterCrop(24), RandomFlip()])(x, rng)``."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        for t in self.transforms:
            x = t(x, rng)
        return x
