"""Built-in SYNTHETIC medical-looking datasets, deterministic by seed (no real patient data).

These images are drawn by this module from simple shapes and filtered noise. They look loosely
like CT slices or chest radiographs so that a CNN has something meaningful to learn offline, in
seconds, with a known ground truth; they are not a substitute for real data, and numbers on them
say nothing about clinical performance.

* :func:`nodule_ct` — CT-like 2D axial slices (``spatial_dims=2``) or 3D volumes
  (``spatial_dims=3``) of a chest: body outline, two lungs with textured parenchyma and vessels
  (bright tubes; in 2D also their round cross-sections), and in the positive class one lung
  nodule: a round (2D) or spherical (3D) blob at a random position inside a lung, of varying
  size and contrast. Binary task ``"binary-class"``, labels ``("no nodule", "nodule")``.
  Position, size, contrast, background brightness, window and noise all vary, so a linear model
  on raw pixels does poorly while a small CNN (local blob detector + pooling) does well.
* :func:`chest_xray` — frontal chest-radiograph-like 2D images with six findings, each present
  independently (multi-label task) and each with its own visual signature:

  ==============  ========================================================================
  opacity         broad, ill-defined brightening over part of one lung
  nodule          small, sharp, round bright spot inside a lung
  mass            large, sharp, round bright blob inside a lung
  atelectasis     raised lung base (smaller lung) with a thin bright band above it
  cardiomegaly    heart shadow much wider than normal
  pneumothorax    dark, texture-free rim along the outer edge of one lung, with a thin line
  ==============  ========================================================================

Each split is generated from its own child of ``numpy.random.SeedSequence(seed)``, so the test
split does not change when the training split's size does, and the same seed gives the same
bytes. Images are ``uint8`` like MedMNIST's, so :class:`cnnfast.dataset.Normalization` applies.
"""

from __future__ import annotations

import functools

import numpy as np

from cnnfast.dataset import BINARY, MULTILABEL, SPLITS, DataError, MedicalDataset, Split

NODULE_LABELS = ("no nodule", "nodule")
FINDINGS = ("opacity", "nodule", "mass", "atelectasis", "cardiomegaly", "pneumothorax")

# name -> (generator, default keyword arguments); used by cnnfast.data.load_dataset
DEFAULT_SIZES = {
    "synthetic-nodule2d": {"spatial_dims": 2, "size": 28, "n_train": 6000, "n_val": 1000,
                           "n_test": 1000},  # the dataset of `cnnfast demo`
    "synthetic-nodule3d": {"spatial_dims": 3, "size": 16, "n_train": 600, "n_val": 150,
                           "n_test": 300},
    "synthetic-chestxray": {"size": 28, "n_train": 3000, "n_val": 500, "n_test": 1000},
}


# --- drawing helpers (coordinates in pixels, arrays (*S)) ---------------------------------------

def _grid(shape: tuple[int, ...]) -> np.ndarray:
    """Pixel-centre coordinates, shape ``(nd, *shape)``."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape],
                                indexing="ij"))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _ellipsoid(coords: np.ndarray, center, radii, edge: float = 0.7) -> np.ndarray:
    """Soft-edged filled ellipse/ellipsoid in ``[0, 1]``; ``edge`` is the blur in pixels."""
    c = np.asarray(center, np.float32).reshape((-1,) + (1,) * (coords.ndim - 1))
    r = np.asarray(radii, np.float32).reshape(c.shape)
    rho = np.sqrt((((coords - c) / r) ** 2).sum(0))
    return _sigmoid((1.0 - rho) * float(np.min(radii)) / edge)


def _gaussian_spot(coords: np.ndarray, center, sigma: float) -> np.ndarray:
    c = np.asarray(center, np.float32).reshape((-1,) + (1,) * (coords.ndim - 1))
    return np.exp(-((coords - c) ** 2).sum(0) / (2 * sigma * sigma))


def _segment(coords: np.ndarray, p0, p1, sigma: float) -> np.ndarray:
    """A tube of Gaussian cross-section ``sigma`` along the segment p0-p1 (peak 1)."""
    shape = (-1,) + (1,) * (coords.ndim - 1)
    a = np.asarray(p0, np.float32).reshape(shape)
    b = np.asarray(p1, np.float32).reshape(shape)
    ab = b - a
    t = np.clip(((coords - a) * ab).sum(0) / max(float((ab ** 2).sum()), 1e-6), 0.0, 1.0)
    d2 = ((coords - (a + t * ab)) ** 2).sum(0)
    return np.exp(-d2 / (2 * sigma * sigma))


@functools.lru_cache(maxsize=16)
def _lowpass(shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """The Fourier transfer function of a Gaussian blur of ``sigma`` pixels (periodic)."""
    freqs = np.meshgrid(*[np.fft.fftfreq(s) for s in shape], indexing="ij")
    return np.exp(-2 * (np.pi * sigma) ** 2 * sum(f * f for f in freqs))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise low-passed with a Gaussian of ``sigma`` pixels, rescaled to unit std."""
    out = np.fft.ifftn(np.fft.fftn(rng.standard_normal(shape)) * _lowpass(shape, sigma)).real
    return (out / (out.std() + 1e-8)).astype(np.float32)


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
    """A random point (float coords, jittered within its pixel) from ``candidates`` ``(M, nd)``,
    the ``np.argwhere`` of a mask."""
    return candidates[rng.integers(len(candidates))].astype(np.float32) + rng.uniform(
        -0.5, 0.5, candidates.shape[1]).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# --- CT slices and volumes with or without a nodule ---------------------------------------------

def _chest_ct(rng: np.random.Generator, coords: np.ndarray, size: int, nodule: bool
              ) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like image ``(*S)`` in [0, 1] (2D axial slice or 3D volume, axis 0 = z) and its
    nodule ``(*center, radius)`` in pixels (NaN without a nodule)."""
    nd = coords.shape[0]
    s = size / 28.0  # all lengths below are for a 28-pixel image
    mid = (size - 1) / 2.0
    inplane = lambda y, x: ([mid] * (nd - 2)) + [y, x]  # noqa: E731
    body_c = inplane(mid + rng.normal(0, 0.6 * s), mid + rng.normal(0, 0.6 * s))
    body_r = [13.5 * s] * (nd - 2) + [rng.uniform(10.0, 11.5) * s, rng.uniform(12.8, 13.6) * s]
    if nd == 3:
        body_r[0] = 40.0 * s  # a cylinder along z: the body fills every slice
    body = _ellipsoid(coords, body_c, body_r)
    img = body * rng.uniform(0.45, 0.55)

    lung_level = rng.uniform(0.08, 0.2)
    texture = _smooth_noise(rng, coords.shape[1:], 0.9 * s) * rng.uniform(0.02, 0.06)
    texture += _smooth_noise(rng, coords.shape[1:], 3.0 * s) * rng.uniform(0.01, 0.04)
    lungs = np.zeros(coords.shape[1:], np.float32)
    lung_masks = []
    for side in (-1, 1):
        c = inplane(body_c[-2] + rng.normal(0, 0.4 * s),
                    body_c[-1] + side * rng.uniform(5.3, 6.3) * s)
        r = [rng.uniform(9.0, 11.0) * s] * (nd - 2) + [rng.uniform(6.5, 7.8) * s,
                                                       rng.uniform(3.8, 4.6) * s]
        m = _ellipsoid(coords, c, r)
        lung_masks.append(m)
        lungs = np.maximum(lungs, m)
    img = img * (1 - lungs) + lungs * (lung_level + texture)

    # Nuisances shared by both classes, sized so that overall brightness says little about a
    # nodule: faint ground-glass patches, and a varying number of vessels.
    inside = np.argwhere(lungs > 0.5)
    for _ in range(rng.integers(0, 3)):
        img = img + lungs * rng.uniform(0.04, 0.1) * _gaussian_spot(
            coords, _pick(rng, inside), rng.uniform(2.5, 4.5) * s)
    vessels = np.zeros_like(img)
    for _ in range(rng.integers(2, 12)):  # tubes: elongated in 2D, long in 3D
        p0 = _pick(rng, inside)
        direction = rng.normal(size=nd)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(2.5, 7.0 if nd == 2 else 12.0) * s
        vessels = np.maximum(vessels, rng.uniform(0.12, 0.32)
                             * _segment(coords, p0, p0 + length * direction,
                                        rng.uniform(0.45, 0.75) * s))
    if nd == 2:  # vessels cut across: small round dots, smaller than a nodule
        for _ in range(rng.integers(1, 9)):
            vessels = np.maximum(vessels, rng.uniform(0.12, 0.35) * _gaussian_spot(
                coords, _pick(rng, inside), rng.uniform(0.45, 0.8) * s))
    img = img + vessels * lungs

    where = np.full(nd + 1, np.nan, np.float32)
    if nodule:  # anywhere in either lung, juxtapleural ones included
        side = lung_masks[rng.integers(2)]
        center = _pick(rng, np.argwhere(side > 0.5))
        radius = rng.uniform(1.2, 3.2) * s
        blob = _ellipsoid(coords, center, [radius] * nd, edge=0.5)
        img = img + rng.uniform(0.18, 0.42) * blob
        where[:nd], where[nd] = center, radius

    img = img + rng.normal(0, rng.uniform(0.012, 0.03), img.shape).astype(np.float32)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.04, 0.04)
    return img, where


def nodule_ct(n: int, seed: int = 0, spatial_dims: int = 2, size: int = 28,
              positive_fraction: float = 0.5, return_nodules: bool = False) -> tuple:
    """``n`` synthetic CT slices/volumes with or without a nodule.

    Returns ``images`` ``(n, 1, size, size)`` (2D) or ``(n, 1, size, size, size)`` (3D) uint8 and
    ``labels`` ``(n, 1)`` int64 (1 = nodule). Exactly ``round(n * positive_fraction)`` positives,
    in random order. Deterministic in ``seed``. With ``return_nodules``, also ``nodules``
    ``(n, spatial_dims + 1)`` float32: each nodule's centre in pixel coordinates (array index
    order: (y, x) or (z, y, x)) and its radius, NaN for images without one (the ground truth
    for localisation checks such as Grad-CAM's); the images are the same either way.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, np.int64)
    labels[: int(round(n * positive_fraction))] = 1
    labels = rng.permutation(labels)
    coords = _grid((size,) * spatial_dims)
    images = np.empty((n, 1) + (size,) * spatial_dims, np.uint8)
    nodules = np.empty((n, spatial_dims + 1), np.float32)
    for i in range(n):
        img, nodules[i] = _chest_ct(rng, coords, size, bool(labels[i]))
        images[i, 0] = _to_uint8(img)
    if return_nodules:
        return images, labels[:, None], nodules
    return images, labels[:, None]


# --- chest X-ray-like images with six findings --------------------------------------------------

def _chest_xray(rng: np.random.Generator, coords: np.ndarray, size: int, findings: np.ndarray
                ) -> np.ndarray:
    """One frontal chest-radiograph-like image ``(H, W)`` in [0, 1]; ``findings`` (6,) bool in
    the order of :data:`FINDINGS`."""
    opacity, nodule, mass, atelectasis, cardiomegaly, pneumothorax = findings
    s = size / 28.0
    mid = (size - 1) / 2.0
    cy, cx = mid + rng.normal(0, 0.5 * s), mid + rng.normal(0, 0.5 * s)
    y, x = coords
    thorax = _ellipsoid(coords, (cy + 1.0 * s, cx), (14.5 * s, 12.5 * s), edge=1.5)
    img = 0.15 + 0.5 * thorax  # soft tissue and bone over a dark background

    lung_level = rng.uniform(0.14, 0.22)
    texture = _smooth_noise(rng, coords.shape[1:], 0.8 * s) * rng.uniform(0.015, 0.035)
    ribs = 0.05 * np.maximum(0, np.sin((y - cy) * (2 * np.pi / (4.2 * s))
                                       + 0.02 * (x - cx) ** 2 / s + rng.uniform(0, 2 * np.pi)))
    sick = rng.integers(2)  # the side that carries the lung findings
    lungs = []
    for side in (0, 1):
        sign = -1 if side == 0 else 1
        c = (cy - 1.0 * s + rng.normal(0, 0.3 * s), cx + sign * rng.uniform(5.8, 6.4) * s)
        r = [rng.uniform(8.8, 9.8) * s, rng.uniform(4.0, 4.6) * s]
        if atelectasis and side == sick:  # volume loss: the base is pulled up
            lift = rng.uniform(0.8, 2.2) * s
            c = (c[0] - lift, c[1])
            r[0] -= lift
        lungs.append((c, r, _ellipsoid(coords, c, r, edge=0.8)))
    lung = np.maximum(lungs[0][2], lungs[1][2])
    img = img * (1 - lung) + lung * (lung_level + texture + ribs)

    # the widths overlap a little, as cardiothoracic ratios near the cut-off do
    heart_w = rng.uniform(5.6, 8.6) * s if cardiomegaly else rng.uniform(4.4, 6.0) * s
    heart = _ellipsoid(coords, (cy + 4.5 * s, cx + 0.8 * s), (4.6 * s, heart_w), edge=0.8)
    img = np.maximum(img, heart * rng.uniform(0.55, 0.65))

    (lc, lr, lmask) = lungs[sick]

    def inside_lung(margin: float) -> np.ndarray:
        """A point at least about ``margin`` pixels inside the affected lung."""
        deep = np.argwhere(lmask > _sigmoid(np.float32(margin / 0.8)))
        return _pick(rng, deep if len(deep) else np.argwhere(lmask > 0.5))

    if opacity:
        c = inside_lung(2.0 * s)
        img = img + lmask * rng.uniform(0.12, 0.22) * _gaussian_spot(
            coords, c, rng.uniform(2.6, 3.6) * s)
    if nodule:
        img = img + rng.uniform(0.25, 0.45) * _ellipsoid(
            coords, inside_lung(1.5 * s), [rng.uniform(0.9, 1.4) * s] * 2, edge=0.4)
    if mass:
        img = img + rng.uniform(0.2, 0.35) * _ellipsoid(
            coords, inside_lung(3.0 * s), [rng.uniform(2.6, 3.6) * s] * 2, edge=0.5)
    if atelectasis:  # a thin bright plate-like band across the lower lung
        y0 = lc[0] + lr[0] * rng.uniform(0.35, 0.6)
        tilt = rng.uniform(-1.0, 1.0) * s
        band = _segment(coords, (y0 - tilt, lc[1] - lr[1] * 0.8), (y0 + tilt, lc[1] + lr[1] * 0.8),
                        0.55 * s)
        img = img + rng.uniform(0.12, 0.3) * band * lmask
    if pneumothorax:  # air beyond a pleural line along the outer edge: dark, no lung markings
        outward = -1 if sick == 0 else 1
        edge_c = (lc[0] + lr[0] * 0.1, lc[1] - outward * lr[1] * rng.uniform(0.12, 0.4))
        collapsed = _ellipsoid(coords, edge_c, (lr[0] * 0.9, lr[1] * 0.7), edge=0.5)
        rim = lmask * (1 - collapsed)
        air = rng.uniform(0.0, 0.08)
        img = img * (1 - rim) + rim * air
        pleura = lmask * np.exp(-((collapsed - 0.5) ** 2) / 0.02)
        img = img + 0.15 * pleura * (1 - collapsed)

    img = img + rng.normal(0, rng.uniform(0.01, 0.025), img.shape).astype(np.float32)
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03)
    return img


def chest_xray(n: int, seed: int = 0, size: int = 28, prevalence: float | tuple = 0.3
               ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic chest-radiograph-like images with six independent findings.

    Returns ``images`` ``(n, 1, size, size)`` uint8 and ``labels`` ``(n, 6)`` int64 in the order
    of :data:`FINDINGS`; each finding is present with probability ``prevalence`` (one value, or
    six). Deterministic in ``seed``.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    rng = np.random.default_rng(seed)
    p = np.broadcast_to(np.asarray(prevalence, float), (len(FINDINGS),))
    labels = (rng.random((n, len(FINDINGS))) < p).astype(np.int64)
    coords = _grid((size, size))
    images = np.empty((n, 1, size, size), np.uint8)
    for i in range(n):
        images[i, 0] = _to_uint8(_chest_xray(rng, coords, size, labels[i].astype(bool)))
    return images, labels


# --- datasets -----------------------------------------------------------------------------------

def _split_seeds(seed: int) -> list[int]:
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    return [int(c.generate_state(1)[0]) for c in children]


def nodule_dataset(n_train: int = 6000, n_val: int = 1000, n_test: int = 1000, seed: int = 0,
                   spatial_dims: int = 2, size: int | None = None) -> MedicalDataset:
    """The synthetic nodule task as a :class:`~cnnfast.dataset.MedicalDataset` (binary).

    Default size: 28 pixels in 2D, 16 voxels in 3D.
    """
    size = size or (28 if spatial_dims == 2 else 16)
    splits = [Split(*nodule_ct(n, s, spatial_dims, size))
              for n, s in zip((n_train, n_val, n_test), _split_seeds(seed))]
    return MedicalDataset(*splits, task=BINARY, label_names=list(NODULE_LABELS),
                          name=f"synthetic-nodule{spatial_dims}d", synthetic=True)


def chestxray_dataset(n_train: int = 3000, n_val: int = 500, n_test: int = 1000, seed: int = 0,
                      size: int = 28) -> MedicalDataset:
    """The synthetic multi-label chest X-ray task as a :class:`~cnnfast.dataset.MedicalDataset`."""
    splits = [Split(*chest_xray(n, s, size))
              for n, s in zip((n_train, n_val, n_test), _split_seeds(seed))]
    return MedicalDataset(*splits, task=MULTILABEL, label_names=list(FINDINGS),
                          name="synthetic-chestxray", synthetic=True)


def load(name: str, seed: int = 0, size: int | None = None, **sizes: int) -> MedicalDataset:
    """A synthetic dataset by name (see :data:`DEFAULT_SIZES`); ``n_train``/``n_val``/``n_test``
    override the default split sizes."""
    if name not in DEFAULT_SIZES:
        raise DataError(f"unknown synthetic dataset {name!r}; choose from "
                        f"{', '.join(DEFAULT_SIZES)}")
    kwargs = {**DEFAULT_SIZES[name], **sizes}
    if size is not None:
        kwargs["size"] = size
    if name == "synthetic-chestxray":
        return chestxray_dataset(seed=seed, **kwargs)
    return nodule_dataset(seed=seed, **kwargs)
