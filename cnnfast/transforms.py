"""Image transforms on NumPy batches ``(N, C, *S)`` (2D ``S = (H, W)``, 3D ``S = (D, H, W)``),
and the radiology preprocessing of one scan.

Deterministic transforms (:func:`center_crop`, :func:`resize`, :func:`normalize`) are plain
functions; random ones take a NumPy Generator. The classes wrap them as callables
``t(x, rng) -> x`` for :class:`cnnfast.data.DataLoader`'s ``transform`` argument, and
:class:`Compose` chains them.

Radiology preprocessing (the second half) works on one image ``(H, W)`` or volume ``(D, H, W)``
in its own units (CT: Hounsfield units) with its voxel spacing in mm: intensity windows
(:func:`window`, presets in :data:`WINDOWS`), :func:`scale_intensity_range`, :func:`zscore`,
:func:`percentile_scale`; :func:`resample` to a target spacing; region-of-interest crops
(:func:`body_box`, :func:`crop_box`) and :func:`pad_or_crop` to the model's size.
:class:`Preprocessing` is a recipe of those steps, stored as JSON (``cnnfast prepare``'s
manifest, a checkpoint's header) so inference repeats exactly what training saw. The intensity
transforms are also classes (:class:`Window`, :class:`ZScore`, :class:`PercentileScale`, and
:class:`PadOrCrop`) that apply per image to a batch and compose with the ones above.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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


# --- radiology preprocessing: one image (H, W) or volume (D, H, W) ------------------------------

#: CT windows (center, width) in Hounsfield units.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


def _image(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.dtype.kind not in "uif" or image.size == 0:
        raise ValueError(f"{what}: expected a numeric image (H, W) or volume (D, H, W), got "
                         f"{image.dtype} array of shape {image.shape}")
    return image


def scale_intensity_range(x: np.ndarray, a_min: float, a_max: float, b_min: float = 0.0,
                          b_max: float = 1.0, clip: bool = True) -> np.ndarray:
    """Map ``[a_min, a_max]`` linearly onto ``[b_min, b_max]`` (float32), clipping outside
    when ``clip`` (MONAI's ``ScaleIntensityRange``)."""
    if not (np.isfinite(a_min) and np.isfinite(a_max) and a_max > a_min):
        raise ValueError(f"a_min, a_max: need finite a_min < a_max, got {a_min}, {a_max}")
    x = np.asarray(x, dtype=np.float64)
    out = (x - a_min) / (a_max - a_min)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return (out * (b_max - b_min) + b_min).astype(np.float32)


def window_bounds(center: float | str, width: float | None = None) -> tuple[float, float]:
    """``(low, high) = (center - width / 2, center + width / 2)``; ``center`` may name a preset
    of :data:`WINDOWS` (then ``width`` is left out)."""
    if isinstance(center, str):
        if center not in WINDOWS:
            raise ValueError(f"window: unknown preset {center!r}; presets: {', '.join(WINDOWS)} "
                             "(or give center and width)")
        if width is not None:
            raise ValueError(f"window: preset {center!r} sets its own width; give no width")
        center, width = WINDOWS[center]
    if width is None or not np.isfinite(width) or width <= 0 or not np.isfinite(center):
        raise ValueError(f"window: width must be a positive number, got center {center}, "
                         f"width {width}")
    return float(center) - float(width) / 2, float(center) + float(width) / 2


def window(x: np.ndarray, center: float | str, width: float | None = None) -> np.ndarray:
    """An intensity window: values in ``center +- width / 2`` mapped linearly to ``[0, 1]``,
    clipped outside (float32). ``window(hu, "lung")`` uses a preset of :data:`WINDOWS`.

    This is the linear window of MONAI's ``ScaleIntensityRange``; DICOM's own VOI window
    (PS3.3 C.11.2.1.2) centres on ``center - 0.5`` over ``width - 1``, a sub-unit difference.
    """
    low, high = window_bounds(center, width)
    return scale_intensity_range(x, low, high)


def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the whole array (float32); a constant array gives zeros."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std()
    return ((x - x.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def percentile_scale(x: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """The ``lower`` and ``upper`` percentiles mapped to 0 and 1, clipped outside (float32);
    a constant array gives zeros (MR and other scans without absolute units)."""
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"lower, upper: need 0 <= lower < upper <= 100, got {lower}, {upper}")
    x = np.asarray(x, dtype=np.float64)
    low, high = np.percentile(x, [lower, upper])
    if high <= low:
        return np.zeros(x.shape, np.float32)
    return scale_intensity_range(x, low, high)


def _spacing_tuple(spacing, nd: int, what: str) -> tuple[float, ...]:
    spacing = (spacing,) * nd if isinstance(spacing, (int, float, np.number)) else tuple(spacing)
    if len(spacing) != nd or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{what} must be a positive number or {nd} positive numbers (mm), got "
                         f"{spacing}")
    return tuple(float(s) for s in spacing)


def _resample_grid(shape, spacing, target):
    """Output shape and, per axis, the input index step and offset of output voxel centres:
    the grids share their first corner, the output has exactly the target spacing."""
    out_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))
    step = np.array([t / s for s, t in zip(spacing, target)])
    return out_shape, step, 0.5 * step - 0.5


def resample(image: np.ndarray, spacing, target_spacing, order: int = 1,
             antialias: bool = True) -> np.ndarray:
    """``image`` (``(H, W)`` or ``(D, H, W)``, voxel ``spacing`` in mm) on a grid of
    ``target_spacing`` (float32): ``round(n * spacing / target)`` voxels per axis, linear
    (``order=1``; 0 for label masks, 3 cubic) with the edge values repeated outside.

    Voxel ``i`` of the output is centred where input index ``(i + 0.5) * t / s - 0.5`` is
    (both grids start at the same corner: :func:`resampled_affine`). Where an axis shrinks
    (``t > s``) and ``antialias``, a Gaussian of sigma ``(t / s - 1) / 2`` voxels smooths it
    first, as scikit-image's ``rescale`` does.
    """
    from scipy import ndimage

    image = _image(image)
    spacing = _spacing_tuple(spacing, image.ndim, "spacing")
    target = _spacing_tuple(target_spacing, image.ndim, "target_spacing")
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic), got {order}")
    out_shape, step, offset = _resample_grid(image.shape, spacing, target)
    x = image.astype(np.float32)
    if antialias and order > 0 and np.any(step > 1):
        x = ndimage.gaussian_filter(x, sigma=np.maximum(0.0, (step - 1) / 2), mode="nearest")
    return ndimage.affine_transform(x, step, offset, output_shape=out_shape, order=order,
                                    mode="nearest").astype(np.float32)


def resampled_affine(affine: np.ndarray, spacing, target_spacing, shape) -> np.ndarray:
    """The voxel-to-world ``affine`` of :func:`resample`'s output, given the input's."""
    nd = len(shape)
    spacing = _spacing_tuple(spacing, nd, "spacing")
    target = _spacing_tuple(target_spacing, nd, "target_spacing")
    _, step, offset = _resample_grid(shape, spacing, target)
    grid = np.eye(nd + 1)
    grid[:nd, :nd] = np.diag(step)
    grid[:nd, nd] = offset
    return np.asarray(affine, dtype=np.float64) @ grid


Box = tuple[tuple[int, int], ...]


def body_box(image: np.ndarray, threshold: float = -500.0, margin: int = 0) -> Box:
    """The bounding box ``((start, stop), ...)`` of the largest connected region above
    ``threshold`` (CT: -500 HU keeps the body and drops the air around it and, when they do not
    touch, the table), grown by ``margin`` voxels; the whole image when nothing is above."""
    from scipy import ndimage

    image = _image(image)
    labels, count = ndimage.label(image > threshold)
    if count == 0:
        return tuple((0, n) for n in image.shape)
    sizes = np.bincount(labels.ravel())[1:]
    region = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    return tuple((max(0, s.start - margin), min(n, s.stop + margin))
                 for s, n in zip(region, image.shape))


def crop_box(image: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """``image[start:stop, ...]`` for a box ``((start, stop), ...)`` of one pair per axis."""
    image = _image(image)
    box = tuple(tuple(int(v) for v in pair) for pair in box)
    if len(box) != image.ndim or any(len(p) != 2 for p in box) or any(
            not 0 <= a < b <= n for (a, b), n in zip(box, image.shape)):
        raise ValueError(f"box: expected {image.ndim} pairs (start, stop) with 0 <= start < stop "
                         f"<= size inside an image of shape {image.shape}, got {box}")
    return image[tuple(slice(a, b) for a, b in box)]


def pad_or_crop(image: np.ndarray, size: int | Sequence[int], value: float | None = None
                ) -> np.ndarray:
    """Centre ``image`` in ``size``: axes that are too long are cropped at both ends, axes too
    short padded at both ends with ``value`` (default: the image's minimum, the background of a
    scan); an odd difference puts the extra voxel at the end."""
    image = _image(image)
    size = _size_tuple(size, image.ndim, "size")
    fill = image.min() if value is None else value
    out = np.full(size, fill, dtype=image.dtype)
    src, dst = [], []
    for n, m in zip(image.shape, size):
        if n >= m:
            start = (n - m) // 2
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:
            start = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = image[tuple(src)]
    return out


def _per_image(x: np.ndarray, fn) -> np.ndarray:
    _spatial(x)
    out = np.empty(x.shape, np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[i, c] = fn(x[i, c])
    return out


class Window:
    """:func:`window` on a batch: ``Window("lung")(x)`` or ``Window(40, 400)(x)``."""

    def __init__(self, center: float | str, width: float | None = None) -> None:
        self.bounds = window_bounds(center, width)

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _spatial(x)
        return scale_intensity_range(x, *self.bounds)


class ZScore:
    """:func:`zscore` of each image and channel of a batch."""

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return _per_image(x, zscore)


class PercentileScale:
    """:func:`percentile_scale` of each image and channel of a batch."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5) -> None:
        percentile_scale(np.zeros(1), lower, upper)  # checks the bounds now
        self.lower, self.upper = lower, upper

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return _per_image(x, lambda a: percentile_scale(a, self.lower, self.upper))


class PadOrCrop:
    """:func:`pad_or_crop` of each image and channel of a batch to spatial ``size``."""

    def __init__(self, size: int | Sequence[int], value: float | None = None) -> None:
        self.size, self.value = size, value

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        nd = _spatial(x)
        size = _size_tuple(self.size, nd, "size")
        return np.stack([np.stack([pad_or_crop(c, size, self.value) for c in img]) for img in x])


INTENSITIES = ("window", "zscore", "percentile", "none")
FITS = ("pad", "resize")


@dataclass(frozen=True)
class Preprocessing:
    """A radiology preprocessing recipe, applied to one scan by :meth:`apply` in this order:

    1. ``spacing``: :func:`resample` to this spacing in mm (one number, or one per axis), if set;
    2. ``roi``: ``"body"`` (:func:`body_box` at ``body_threshold``, grown by ``margin``), a box
       ``((start, stop), ...)`` in voxels of the resampled grid (:func:`crop_box`), or None;
    3. ``intensity``: ``"window"`` (``window``: a preset name of :data:`WINDOWS` or
       ``(center, width)``), ``"zscore"``, ``"percentile"`` (``percentiles``) or ``"none"``;
    4. ``fit`` to ``size`` (``(H, W)`` or ``(D, H, W)``): ``"pad"`` (:func:`pad_or_crop`,
       the spacing kept) or ``"resize"`` (linear, :func:`resize`; the spacing changes).

    :meth:`to_dict` / :meth:`from_dict` give and read its JSON form.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    roi: str | tuple | None = None
    intensity: str = "window"
    window: str | tuple[float, float] = "lung"
    percentiles: tuple[float, float] = (0.5, 99.5)
    body_threshold: float = -500.0
    margin: int = 0
    fit: str = "pad"

    def __post_init__(self) -> None:
        size = tuple(self.size) if not isinstance(self.size, (int, np.integer)) else (self.size,)
        if len(size) not in (2, 3):
            raise ValueError(f"size: expected (H, W) or (D, H, W), got {self.size!r}")
        object.__setattr__(self, "size", _size_tuple(size, len(size), "size"))
        nd = len(self.size)
        if self.spacing is not None:
            object.__setattr__(self, "spacing", _spacing_tuple(self.spacing, nd, "spacing"))
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES}, got {self.intensity!r}")
        win = self.window if isinstance(self.window, str) else tuple(self.window)
        if isinstance(win, str):
            window_bounds(win)
        elif len(win) != 2:
            raise ValueError(f"window: expected a preset name or (center, width), got {win!r}")
        else:
            window_bounds(*win)
            win = (float(win[0]), float(win[1]))
        object.__setattr__(self, "window", win)
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        percentile_scale(np.zeros(1), *self.percentiles)
        if self.roi is not None and self.roi != "body":
            box = tuple(tuple(int(v) for v in pair) for pair in self.roi)
            if len(box) != nd or any(len(p) != 2 or p[0] < 0 or p[1] <= p[0] for p in box):
                raise ValueError(f"roi: expected 'body' or {nd} pairs (start, stop), got "
                                 f"{self.roi!r}")
            object.__setattr__(self, "roi", box)
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if not isinstance(self.margin, (int, np.integer)) or self.margin < 0:
            raise ValueError(f"margin must be a non-negative int, got {self.margin!r}")

    @property
    def spatial_dims(self) -> int:
        return len(self.size)

    def apply(self, image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """The preprocessed ``image`` (its voxel ``spacing`` in mm), float32 of shape
        ``size``."""
        image = _image(image)
        if image.ndim != self.spatial_dims:
            raise ValueError(f"image: this recipe is for {self.spatial_dims}D images of size "
                             f"{self.size}, got a {image.ndim}D one of shape {image.shape}")
        x = image.astype(np.float32)
        if self.spacing is not None:
            x = resample(x, spacing, self.spacing)
        if self.roi == "body":
            x = crop_box(x, body_box(x, self.body_threshold, self.margin))
        elif self.roi is not None:
            box = tuple((a, min(b, n)) for (a, b), n in zip(self.roi, x.shape))
            x = crop_box(x, box)
        if self.intensity == "window":
            win = self.window
            x = window(x, win) if isinstance(win, str) else window(x, *win)
        elif self.intensity == "zscore":
            x = zscore(x)
        elif self.intensity == "percentile":
            x = percentile_scale(x, *self.percentiles)
        if self.fit == "pad":
            return pad_or_crop(x, self.size)
        return resize(x[None, None], self.size)[0, 0]

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("size", "spacing", "window", "percentiles"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        if isinstance(d["roi"], tuple):
            d["roi"] = [list(p) for p in d["roi"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """The recipe of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing: expected a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown or "size" not in d:
            raise ValueError(f"preprocessing: unknown keys {unknown} or no size in {d}")
        return cls(**d)
