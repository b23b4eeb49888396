"""Reading scans: DICOM series, single DICOM images and NIfTI volumes, as arrays with spacing.

Every reader returns a :class:`Scan`: the pixel values as float32 (CT in Hounsfield units), the
voxel spacing in millimetres, and for volumes the affine from voxel index to patient coordinates.
Volumes come in one canonical orientation whatever the file's, so a model sees every scan the
same way round:

* the voxel grid is the closest RAS+ grid (``nibabel.as_closest_canonical``: +x towards the
  patient's Right, +y Anterior, +z Superior), and the array axes ``(D, H, W)`` are its
  ``(z, y, x)``: ``D`` runs inferior to superior (axial slices first), ``H`` posterior to
  anterior, ``W`` left to right. ``Scan.affine`` maps ``(d, h, w, 1)`` to RAS millimetres and
  ``Scan.spacing`` is ``(dD, dH, dW)``.
* a DICOM series is turned into that grid from its headers: slices sorted by their position
  (ImagePositionPatient) along the slice normal (ImageOrientationPatient), never by file name;
  RescaleSlope / RescaleIntercept (or a Modality LUT) applied per slice; in-plane spacing from
  PixelSpacing, slice spacing from the positions. A series whose slices differ in orientation,
  size or series, repeat a position, leave a gap (a missing slice) or do not lie along the normal
  (gantry tilt) is refused.
* a single DICOM image (an X-ray, one CT slice) is 2D: ``(H, W)`` rows by columns as stored,
  MONOCHROME1 inverted so that higher is brighter, spacing from PixelSpacing (or
  ImagerPixelSpacing), ``affine`` None.

Refused with :class:`ScanError` (a :class:`~cnnfast.dataset.DataError`) naming the file: colour
images, multi-frame files, files without pixel data, 4D NIfTI, and pixel data compressed with a
transfer syntax that none of pydicom's installed plugins decodes; that message names the
plugins that would (``pip install pylibjpeg pylibjpeg-libjpeg``, ``python-gdcm``, ...).

pydicom and nibabel are imported on first use (``pip install "cnnfast[medical]"``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnfast.dataset import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIX = ".dcm"
_ORIENTATION_TOL = 1e-4  # direction cosines of slices of one series agree to this
_GAP_TOL = 0.05  # a slice step more than 5% off the series' step is a gap or an overlap


class ScanError(DataError):
    """A scan that cannot be read; the message names the file and says why."""


@dataclass
class Scan:
    """One image or volume: ``array`` float32 ``(H, W)`` or ``(D, H, W)``; ``spacing`` in mm per
    axis; ``affine`` (4 x 4, voxel index -> RAS mm) for volumes, None for 2D images;
    ``source`` the file or folder; ``kind`` ``"dicom-series"``, ``"dicom-image"`` or
    ``"nifti"``; ``info`` what the headers said (modality, transfer syntax, original axis
    codes) that is safe to record (no patient data)."""

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    source: str
    kind: str
    info: dict = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim


def _require(module: str):
    """Import pydicom or nibabel, or say how to install them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading DICOM and NIfTI files needs {module.split('.')[0]}: "
                          'pip install "cnnfast[medical]"') from None


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")


# --- DICOM --------------------------------------------------------------------------------------

def _plugin_hint(missing: list[str]) -> str:
    """pydicom's 'plugin - requires a>=1 and b>=2' lines -> 'pip install a b, or pip install c'
    (pylibjpeg first: wheels for every platform)."""
    options = []
    for line in missing:
        names = [n for n in re.findall(r"([A-Za-z][A-Za-z0-9_.-]*)\s*>=", line) if n != "numpy"]
        if not names:
            names = [line.split(" ")[0]]
        options.append("pip install " + " ".join("python-gdcm" if n == "gdcm" else n
                                                 for n in names))
    options.sort(key=lambda o: "pylibjpeg" not in o)
    return ", or ".join(options) if options else "no pydicom plugin decodes it"


def _read_dicom(path: Path, stop_before_pixels: bool = False):
    pydicom = _require("pydicom")
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise ScanError(f"{path}: not a DICOM file (no DICM preamble)") from None
    except (OSError, ValueError, EOFError, KeyError, AttributeError, TypeError) as exc:
        raise ScanError(f"{path}: cannot read the DICOM file ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None


def _transfer_syntax(ds):
    meta = getattr(ds, "file_meta", None)
    return None if meta is None else meta.get("TransferSyntaxUID")


def _stored_pixels(ds, path: Path) -> np.ndarray:
    """The stored pixel values of a grey single-frame image, or a :class:`ScanError` that says
    which DICOM variant it is and, for compressed data, which plugin would decode it."""
    if "PixelData" not in ds:
        raise ScanError(f"{path}: has no pixel data (a {ds.get('Modality', 'non-image')} object)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ScanError(f"{path}: a colour image ({ds.get('PhotometricInterpretation', '?')}, "
                        f"{ds.SamplesPerPixel} samples per pixel); cnnfast reads grey images")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ScanError(f"{path}: a multi-frame image ({ds.NumberOfFrames} frames); cnnfast reads "
                        "one image per file (a series folder of single-frame slices)")
    uid = _transfer_syntax(ds)
    if uid is not None and uid.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise ScanError(f"{path}: pydicom has no decoder for its transfer syntax "
                            f"{uid.name} ({uid})") from None
        if not decoder.is_available:
            raise ScanError(f"{path}: its pixel data is compressed as {uid.name} ({uid}), which "
                            f"pydicom decodes only with a plugin: "
                            f"{_plugin_hint(decoder.missing_dependencies)}")
    try:
        pixels = ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError) as exc:
        hint = ""
        if uid is not None and uid.is_compressed:
            from pydicom.pixels import get_decoder

            missing = get_decoder(uid).missing_dependencies
            hint = f"; another plugin may decode it: {_plugin_hint(missing)}"
        raise ScanError(f"{path}: cannot decode its pixel data "
                        f"({' '.join(str(exc).split())[:300]}){hint}") from None
    if pixels.ndim != 2:
        raise ScanError(f"{path}: expected a 2D grey image, got pixel data of shape "
                        f"{pixels.shape}")
    return pixels


def _modality_values(ds, pixels: np.ndarray, path: Path) -> np.ndarray:
    """Stored values -> modality values (CT: HU) as float32: RescaleSlope/Intercept or a
    Modality LUT (pydicom's ``apply_modality_lut``)."""
    from pydicom.pixels import apply_modality_lut

    try:
        values = apply_modality_lut(pixels, ds)
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ScanError(f"{path}: cannot apply its rescale / modality LUT ({exc})") from None
    values = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ScanError(f"{path}: its rescaled pixel values are not finite")
    return values


def _numbers(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _floats(ds, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (count,) or not np.all(np.isfinite(out)):
        raise ScanError(f"{path}: needs {keyword} ({count} numbers) to be placed in a volume, "
                        f"got {value!r}")
    return out


def _pixel_spacing(ds, path: Path, required: bool) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            spacing = _floats(ds, keyword, 2, path)
            if np.any(spacing <= 0):
                raise ScanError(f"{path}: {keyword} must be positive, got {_numbers(spacing)}")
            return float(spacing[0]), float(spacing[1])
    if required:
        raise ScanError(f"{path}: has no PixelSpacing; the slices of a series need it")
    return None


def read_dicom_image(path: str | os.PathLike) -> Scan:
    """One DICOM file as a 2D image ``(H, W)`` (see the module doc). Spacing defaults to 1 mm
    (``info["spacing_known"]`` False) when the file gives none."""
    path = Path(path)
    ds = _read_dicom(path)
    pixels = _stored_pixels(ds, path)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        # MONOCHROME1 shows the lowest value white: flip it within the stored range
        bits = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        pixels = (low + high) - pixels.astype(np.int64)
    values = _modality_values(ds, pixels, path)
    spacing = _pixel_spacing(ds, path, required=False)
    info = _dicom_info(ds)
    info["spacing_known"] = spacing is not None
    return Scan(values, spacing or (1.0, 1.0), None, str(path), "dicom-image", info)


def _dicom_info(ds) -> dict:
    uid = _transfer_syntax(ds)
    return {"modality": str(ds.get("Modality", "")),
            "transfer_syntax": str(uid.name) if uid is not None else "",
            "photometric": str(ds.get("PhotometricInterpretation", ""))}


def read_dicom_series(folder: str | os.PathLike) -> Scan:
    """A folder holding one DICOM series (one file per slice, any file names) as a volume
    ``(D, H, W)`` in the canonical orientation (see the module doc)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(f"{folder}: not a folder (a DICOM series is a folder of slice files)")
    files = _dicom_files(folder)
    if not files:
        raise ScanError(f"{folder}: no files; a DICOM series folder holds one file per slice")
    slices = []
    for f in files:
        ds = _read_dicom(f)
        orientation = _floats(ds, "ImageOrientationPatient", 6, f)
        position = _floats(ds, "ImagePositionPatient", 3, f)
        slices.append((f, ds, orientation, position))
    _check_same_series(folder, slices)
    f0, ds0, orientation, _ = slices[0]
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise ScanError(f"{f0}: ImageOrientationPatient {_numbers(orientation)} is not two "
                        "orthogonal unit vectors")
    slices.sort(key=lambda s: float(s[3] @ normal))
    positions = np.array([s[3] for s in slices])
    step = _slice_step(folder, slices, positions, normal, ds0)
    row_spacing, col_spacing = _pixel_spacing(ds0, f0, required=True)
    volume = np.stack([_modality_values(ds, _stored_pixels(ds, f), f)
                       for f, ds, _, _ in slices])  # (k, r, c)
    # voxel (k, r, c) -> LPS mm: columns along the row direction, rows along the column direction
    lps = np.eye(4)
    lps[:3, 0] = normal * step
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = row_dir * col_spacing
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    info = _dicom_info(ds0)
    info["slices"] = len(slices)
    return _canonical(volume, ras, str(folder), "dicom-series", info)


def _check_same_series(folder: Path, slices: list) -> None:
    first_file, first, first_orientation, _ = slices[0]
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds, _, _ in slices}
    if len(series) > 1:
        raise ScanError(f"{folder}: holds {len(series)} series (SeriesInstanceUID differs); "
                        "put each series in its own folder")
    for f, ds, orientation, _ in slices[1:]:
        if np.max(np.abs(orientation - first_orientation)) > _ORIENTATION_TOL:
            raise ScanError(f"{folder}: slices have different orientations: {f.name} has "
                            f"ImageOrientationPatient {_numbers(orientation)}, {first_file.name} "
                            f"{_numbers(first_orientation)}")
        if (ds.get("Rows"), ds.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            raise ScanError(f"{folder}: slices have different sizes: {f.name} is "
                            f"{ds.get('Rows')} x {ds.get('Columns')}, {first_file.name} "
                            f"{first.get('Rows')} x {first.get('Columns')}")
        if ds.get("PixelSpacing") != first.get("PixelSpacing"):
            raise ScanError(f"{folder}: slices have different PixelSpacing: {f.name} "
                            f"{ds.get('PixelSpacing')}, {first_file.name} "
                            f"{first.get('PixelSpacing')}")


def _slice_step(folder: Path, slices: list, positions: np.ndarray, normal: np.ndarray,
                ds0) -> float:
    """The distance between neighbouring slices along the normal; refuse gaps, repeats and
    slices that do not line up along the normal."""
    if len(slices) == 1:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            if ds0.get(keyword):
                return float(ds0.get(keyword))
        return 1.0
    steps = np.diff(positions @ normal)
    names = [s[0].name for s in slices]
    for i, d in enumerate(steps):
        if d < 1e-3:
            raise ScanError(f"{folder}: {names[i]} and {names[i + 1]} lie at the same position "
                            f"{_numbers(positions[i])}: repeated slices")
    step = float(np.median(steps))
    for i, d in enumerate(steps):
        if abs(d - step) > _GAP_TOL * step:
            raise ScanError(f"{folder}: a gap in the series: {names[i]} and {names[i + 1]} are "
                            f"{d:.3g} mm apart, the other slices {step:.3g} mm (a missing "
                            "slice?)")
    offsets = positions - positions[0]
    sideways = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.linalg.norm(sideways, axis=1)) > 0.01 * step * len(slices):
        raise ScanError(f"{folder}: the slice positions do not run along the slice normal "
                        "(a gantry tilt or a sheared series), which cnnfast does not resample")
    return step


# --- NIfTI and the canonical grid ---------------------------------------------------------------

def _canonical(volume_krc: np.ndarray, affine_krc: np.ndarray, source: str, kind: str,
               info: dict) -> Scan:
    """A volume whose array axes are those of ``affine`` -> :class:`Scan` on the closest RAS
    grid, array ``(z, y, x)``: the same path as a NIfTI file."""
    nib = _require("nibabel")
    # nibabel's images index (i, j, k); ours were built (k, r, c): hand it the axes reversed
    perm = np.eye(4)[[2, 1, 0, 3]].T
    image = nib.Nifti1Image(np.ascontiguousarray(volume_krc.transpose(2, 1, 0)),
                            affine_krc @ perm)
    return _scan_from_nifti(image, source, kind, info)


def _scan_from_nifti(image, source: str, kind: str, info: dict) -> Scan:
    nib = _require("nibabel")
    info = dict(info)
    info["axcodes"] = "".join(nib.aff2axcodes(image.affine))
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.get_fdata(dtype=np.float32))  # (x, y, z) = RAS
    affine = canonical.affine @ np.eye(4)[[2, 1, 0, 3]].T  # index (z, y, x) -> RAS mm
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    if not np.all(np.isfinite(array)):
        raise ScanError(f"{source}: holds non-finite voxel values (NaN or infinity)")
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return Scan(array, spacing, affine, source, kind, info)


def read_nifti(path: str | os.PathLike) -> Scan:
    """A ``.nii`` / ``.nii.gz`` file as a volume ``(D, H, W)`` in the canonical orientation,
    scaled by its scl_slope / scl_inter. A 2D file becomes one slice; 4D (a time series) is
    refused unless its fourth axis has length 1."""
    nib = _require("nibabel")
    path = Path(path)
    if not is_nifti(path):
        raise ScanError(f"{path}: not a NIfTI file name (.nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        shape = image.shape
    except (nib.filebasedimages.ImageFileError, OSError, ValueError, EOFError) as exc:
        raise ScanError(f"{path}: cannot read the NIfTI file ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
    if len(shape) == 4 and shape[3] == 1 or len(shape) == 2:
        image = image.slicer[..., 0] if len(shape) == 4 else nib.Nifti1Image(
            np.asanyarray(image.dataobj)[..., None], image.affine, image.header)
    elif len(shape) != 3:
        raise ScanError(f"{path}: a {len(shape)}D image of shape {shape}; cnnfast reads 3D "
                        "volumes (one time point: split 4D series first)")
    return _scan_from_nifti(image, str(path), "nifti", {})


def read_scan(path: str | os.PathLike) -> Scan:
    """Any supported scan: a folder (a DICOM series), a ``.nii``/``.nii.gz`` file, or another
    file read as a single DICOM image."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder")
    if is_nifti(path):
        return read_nifti(path)
    return read_dicom_image(path)


def scan_items(path: str | os.PathLike, spatial_dims: int) -> list[Path]:
    """The scans at ``path`` for a model of ``spatial_dims``: a NIfTI or DICOM file is one; a
    folder holds, for 3D, NIfTI files and DICOM series folders (or is itself one series when it
    holds neither), and for 2D, DICOM image files (``.dcm``). Sorted by name."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise ScanError(f"{path}: no such file or folder")
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if spatial_dims == 3:
        items = [p for p in entries if p.is_dir() or is_nifti(p)]
        return items or [path]
    items = [p for p in entries if p.is_file() and p.suffix.lower() == DICOM_SUFFIX]
    if not items:
        raise ScanError(f"{path}: no DICOM images (.dcm files) for a 2D model")
    return items
