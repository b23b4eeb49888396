"""Scans with a known truth for the DICOM / NIfTI tests: a volume is made on a RAS grid
(``canonical``, indexed ``[x, y, z]``, affine ``diag(spacing)`` + origin), then written in another
orientation as a DICOM series (pydicom's bundled ``CT_small.dcm`` as the template of every slice)
or as a NIfTI file (nibabel). Whatever the orientation written, cnnfast must read back
``canonical.transpose(2, 1, 0)``, the ``(z, y, x)`` array of that grid.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (DICOM's patient coordinates)


def grid_affine(spacing, origin) -> np.ndarray:
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def sphere(shape, spacing, origin, center, radius, inside=1000.0, outside=-1000.0):
    """A ball of ``inside`` HU of ``radius`` mm around ``center`` (RAS mm) on the grid
    ``[x, y, z]``, ``outside`` elsewhere (integers)."""
    idx = np.indices(shape).reshape(3, -1).T
    world = idx * np.asarray(spacing) + np.asarray(origin)
    d = np.linalg.norm(world - np.asarray(center), axis=1).reshape(shape)
    return np.where(d <= radius, inside, outside)


def reoriented(canonical: np.ndarray, affine: np.ndarray, axes, flips):
    """The grid's array with its axes put in order ``axes`` and flipped where ``flips``, and
    that array's voxel-to-RAS affine."""
    view = canonical.transpose(axes)
    for i, f in enumerate(flips):
        if f:
            view = np.flip(view, i)
    index = np.zeros((4, 4))
    index[3, 3] = 1
    for i, (axis, f) in enumerate(zip(axes, flips)):
        index[axis, i] = -1 if f else 1
        index[axis, 3] = canonical.shape[axis] - 1 if f else 0
    return np.ascontiguousarray(view), affine @ index


AXIAL = ((2, 1, 0), (False, True, True))  # the usual CT: columns to patient left, rows posterior
SAGITTAL = ((0, 2, 1), (False, True, True))  # columns posterior, rows inferior


def template():
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def write_slice(path: Path, ds, stored: np.ndarray, position_lps, row_dir_lps, col_dir_lps,
                pixel_spacing, slope: float = 1.0, intercept: float = -1024.0,
                instance: int = 1) -> None:
    from pydicom.uid import generate_uid

    ds = copy.deepcopy(ds)
    stored = np.asarray(stored, dtype="<i2")
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position_lps]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir_lps, *col_dir_lps)]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.InstanceNumber = instance
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, canonical: np.ndarray, spacing, origin, view=AXIAL,
                 rng: np.random.Generator | None = None, slopes=None,
                 intercept: float = -1024.0) -> list[Path]:
    """``canonical`` (integer HU, ``[x, y, z]``) as one DICOM file per slice in ``folder``, cut
    along ``view``; files named in a random order when ``rng`` is given (never position order);
    ``slopes`` one RescaleSlope per slice (HU must then be divisible by it). Returns the files
    in slice order."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    slices, affine = reoriented(canonical, grid_affine(spacing, origin), *view)
    ds = template()
    ds.SeriesInstanceUID = generate_uid()
    n = len(slices)
    names = list(range(n))
    if rng is not None:
        names = list(rng.permutation(n))
        if names == sorted(names):
            names.reverse()
    slopes = [1.0] * n if slopes is None else slopes
    row_dir = LPS @ affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col_dir = LPS @ affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    pixel_spacing = (np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 2]))
    files = []
    for k in range(n):
        position = LPS @ (affine @ [k, 0, 0, 1])[:3]
        stored = (slices[k] - intercept) / slopes[k]
        assert np.array_equal(stored, np.round(stored))
        path = folder / f"IM{names[k]:04d}"
        write_slice(path, ds, stored, position, row_dir, col_dir, pixel_spacing, slopes[k],
                    intercept, instance=k + 1)
        files.append(path)
    return files


def write_nifti(path: Path, canonical: np.ndarray, spacing, origin, axes=(0, 1, 2),
                flips=(False, False, False), dtype=np.int16) -> Path:
    """``canonical`` written as NIfTI with its axes in order ``axes``, flipped where ``flips``."""
    import nibabel as nib

    data, affine = reoriented(canonical, grid_affine(spacing, origin), axes, flips)
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(path))
    return path
