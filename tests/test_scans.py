"""DICOM and NIfTI readers (cnnfast.scans) on pydicom's and nibabel's bundled files and on series
and volumes built from them with a known truth (tests/medical_files.py); no downloads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

import medical_files as mf  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from cnnfast import scans  # noqa: E402
from cnnfast.scans import ScanError  # noqa: E402

SHAPE, SPACING, ORIGIN = (12, 10, 7), (0.8, 1.1, 2.5), (-30.0, 12.0, 40.0)


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def raw_int16(ds) -> np.ndarray:
    """Stored values straight from the PixelData bytes (not through pydicom's pixel_array)."""
    dtype = "<i2" if ds.PixelRepresentation == 1 else "<u2"
    return np.frombuffer(ds.PixelData, dtype).reshape(ds.Rows, ds.Columns)


def volume(seed=0):
    """Integer HU on the [x, y, z] test grid: distinct values, so any mix-up shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, SHAPE) // 2 * 2  # even: RescaleSlope 2 stores them exactly


# --- single images ------------------------------------------------------------------------------

def test_ct_slice_is_rescaled_to_hounsfield_units():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    scan = scans.read_dicom_image(path)
    expected = raw_int16(ds) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024 and scan.array.dtype == np.float32
    np.testing.assert_array_equal(scan.array, expected)
    assert scan.spacing == pytest.approx((0.661468, 0.661468))
    assert scan.affine is None and scan.kind == "dicom-image"
    assert scan.info["modality"] == "CT"


@pytest.mark.parametrize("variant", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                     "MR_small_RLE.dcm", "MR_small_expb.dcm"])
def test_transfer_syntax_variants_read_the_same_pixels(variant):
    reference = pydicom.dcmread(bundled("MR_small.dcm"))
    scan = scans.read_dicom_image(bundled(variant))
    np.testing.assert_array_equal(scan.array, raw_int16(reference))
    assert scan.spacing == pytest.approx((0.3125, 0.3125))


def test_jpeg2000_is_decoded_when_a_plugin_is_there():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    if not get_decoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 decoder installed")
    scan = scans.read_dicom_image(bundled("MR_small_jp2klossless.dcm"))
    np.testing.assert_array_equal(scan.array, raw_int16(pydicom.dcmread(bundled("MR_small.dcm"))))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    stored = raw_int16(ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    scan = scans.read_dicom_image(tmp_path / "m1.dcm")
    assert ds.BitsStored == 16 and ds.PixelRepresentation == 1  # range -32768..32767
    np.testing.assert_array_equal(scan.array, -1 - stored.astype(np.int64))


def test_compressed_without_a_plugin_names_the_plugin():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = bundled("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(ScanError) as err:
        scans.read_dicom_image(path)
    message = str(err.value)
    assert "MR_small_jpeg_ls_lossless.dcm" in message and "JPEG-LS" in message
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in message and "python-gdcm" in message


def test_a_plugin_that_fails_is_reported_with_the_others():
    # 12-bit JPEG Extended: Pillow is available but cannot decode 12-bit samples
    path = bundled("JPEG-lossy.dcm")
    try:
        scans.read_dicom_image(path)
    except ScanError as exc:
        assert "JPEG-lossy.dcm" in str(exc) and "pylibjpeg" in str(exc)
    else:
        pytest.skip("a 12-bit JPEG decoder is installed here")


@pytest.mark.parametrize("name, words", [
    ("SC_rgb_small_odd.dcm", "colour"),
    ("rtdose.dcm", "multi-frame"),
    ("rtplan.dcm", "no pixel data"),
])
def test_unsupported_dicom_objects_are_refused(name, words):
    with pytest.raises(ScanError, match=words):
        scans.read_dicom_image(bundled(name))


def test_not_a_dicom_file(tmp_path):
    (tmp_path / "notes.dcm").write_text("hello")
    with pytest.raises(ScanError, match="notes.dcm: not a DICOM file"):
        scans.read_scan(tmp_path / "notes.dcm")
    with pytest.raises(ScanError, match="no such file"):
        scans.read_scan(tmp_path / "missing.nii")


# --- series -------------------------------------------------------------------------------------

@pytest.mark.parametrize("view", [mf.AXIAL, mf.SAGITTAL, ((2, 0, 1), (True, False, True))],
                         ids=["axial", "sagittal", "reversed-coronal"])
def test_series_reads_back_the_canonical_grid(tmp_path, view):
    hu = volume()
    files = mf.write_series(tmp_path / "s", hu, SPACING, ORIGIN, view,
                            rng=np.random.default_rng(1))
    assert [f.name for f in files] != sorted(f.name for f in files)  # name order is wrong
    scan = scans.read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(scan.array, hu.transpose(2, 1, 0))
    expected = mf.grid_affine(SPACING, ORIGIN) @ np.eye(4)[[2, 1, 0, 3]]
    np.testing.assert_allclose(scan.affine, expected, atol=1e-5)
    assert scan.spacing == pytest.approx(SPACING[::-1], abs=1e-5)
    assert scan.kind == "dicom-series" and scan.info["slices"] == len(files)


def test_series_applies_each_slices_rescale(tmp_path):
    hu = volume()
    n = SHAPE[2]
    slopes = [2.0 if k % 3 == 0 else 1.0 for k in range(n)]
    files = mf.write_series(tmp_path / "s", hu, SPACING, ORIGIN, slopes=slopes, intercept=-1000)
    ds = pydicom.dcmread(files[3])
    assert float(ds.RescaleSlope) == 2.0
    by_hand = raw_int16(ds) * 2.0 - 1000.0  # slice 3, rows posterior, columns to the left
    scan = scans.read_scan(tmp_path / "s")
    np.testing.assert_array_equal(scan.array[3], by_hand[::-1, ::-1])
    np.testing.assert_array_equal(scan.array, hu.transpose(2, 1, 0))


def _series(tmp_path, hu=None):
    files = mf.write_series(tmp_path / "s", volume() if hu is None else hu, SPACING, ORIGIN)
    return tmp_path / "s", files


def test_missing_slice_is_refused(tmp_path):
    folder, files = _series(tmp_path)
    files[3].unlink()
    with pytest.raises(ScanError, match="gap in the series: IM0002 and IM0004 are 5 mm apart"):
        scans.read_dicom_series(folder)


def test_mixed_orientation_is_refused(tmp_path):
    folder, files = _series(tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]  # tilted 0.1 rad
    ds.save_as(files[2])
    with pytest.raises(ScanError, match="different orientations: IM0002"):
        scans.read_dicom_series(folder)


def test_mixed_sizes_and_series_are_refused(tmp_path):
    folder, files = _series(tmp_path)
    ds = pydicom.dcmread(files[1])
    ds.Rows, ds.Columns = 4, 4
    ds.PixelData = np.zeros((4, 4), "<i2").tobytes()
    ds.save_as(files[1])
    with pytest.raises(ScanError, match="different sizes"):
        scans.read_dicom_series(folder)
    other = mf.write_series(tmp_path / "t", volume(1), SPACING, ORIGIN)
    shutil.copy(other[0], folder / "other")
    files[1].unlink()
    with pytest.raises(ScanError, match="holds 2 series"):
        scans.read_dicom_series(folder)


def test_repeated_slice_and_tilt_are_refused(tmp_path):
    folder, files = _series(tmp_path)
    shutil.copy(files[2], folder / "copy")
    with pytest.raises(ScanError, match="same position"):
        scans.read_dicom_series(folder)
    (folder / "copy").unlink()
    for k, f in enumerate(files):  # shift each slice sideways: a gantry tilt
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k * SPACING[2], z]
        ds.save_as(f)
    with pytest.raises(ScanError, match="gantry tilt"):
        scans.read_dicom_series(folder)


def test_single_slice_series_takes_the_slice_thickness(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(bundled("CT_small.dcm"), folder / "a.dcm")
    scan = scans.read_scan(folder)
    assert scan.array.shape == (1, 128, 128)
    assert scan.spacing == pytest.approx((5.0, 0.661468, 0.661468))


# --- NIfTI --------------------------------------------------------------------------------------

def test_bundled_nifti_las_is_flipped_to_ras():
    from nibabel.testing import data_path

    path = os.path.join(data_path, "anatomical.nii")
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    raw = np.asarray(image.dataobj, dtype=np.float32)
    scan = scans.read_nifti(path)
    np.testing.assert_array_equal(scan.array, raw[::-1].transpose(2, 1, 0))  # flip x only
    assert scan.spacing == (2.0, 2.0, 2.0) and scan.info["axcodes"] == "LAS"
    # the affine still says where each voxel is: voxel (0, 0, 0) was raw voxel (X - 1, 0, 0)
    np.testing.assert_allclose(scan.affine[:, 3], image.affine @ [raw.shape[0] - 1, 0, 0, 1])


def test_bundled_nifti_zooms_follow_the_axes():
    from nibabel.testing import data_path

    scan = scans.read_nifti(os.path.join(data_path, "standard.nii.gz"))
    assert scan.array.shape == (7, 5, 4) and scan.spacing == (2.0, 3.0, 1.0)


@pytest.mark.parametrize("axes, flips", [((0, 1, 2), (False, False, False)),
                                         ((1, 0, 2), (True, False, True)),
                                         ((2, 0, 1), (False, True, True))])
def test_nifti_in_any_orientation_reads_back_the_canonical_grid(tmp_path, axes, flips):
    hu = volume()
    path = mf.write_nifti(tmp_path / "v.nii.gz", hu, SPACING, ORIGIN, axes, flips)
    scan = scans.read_scan(path)
    np.testing.assert_array_equal(scan.array, hu.transpose(2, 1, 0))
    np.testing.assert_allclose(scan.affine, mf.grid_affine(SPACING, ORIGIN)
                               @ np.eye(4)[[2, 1, 0, 3]], atol=1e-5)


def test_nifti_and_dicom_of_one_grid_agree(tmp_path):
    hu = volume(3)
    a = scans.read_scan(mf.write_nifti(tmp_path / "v.nii", hu, SPACING, ORIGIN, (2, 0, 1),
                                       (True, True, False)))
    mf.write_series(tmp_path / "s", hu, SPACING, ORIGIN, mf.SAGITTAL)
    b = scans.read_scan(tmp_path / "s")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_nifti_scaling_and_dimensions(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, -10)
    nib.save(image, tmp_path / "scaled.nii")
    scan = scans.read_nifti(tmp_path / "scaled.nii")
    np.testing.assert_array_equal(scan.array, (data * 0.5 - 10).transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(data[..., None], np.eye(4)), tmp_path / "t1.nii")
    assert scans.read_nifti(tmp_path / "t1.nii").array.shape == (4, 3, 2)
    nib.save(nib.Nifti1Image(data[:, :, 0], np.eye(4)), tmp_path / "flat.nii")
    assert scans.read_nifti(tmp_path / "flat.nii").array.shape == (1, 3, 2)
    from nibabel.testing import data_path

    with pytest.raises(ScanError, match="4D image of shape"):
        scans.read_nifti(os.path.join(data_path, "functional.nii"))
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(ScanError, match="bad.nii.gz: cannot read"):
        scans.read_nifti(tmp_path / "bad.nii.gz")


# --- imports ------------------------------------------------------------------------------------

def test_import_cnnfast_loads_neither_pydicom_nor_nibabel():
    code = ("import sys, cnnfast, cnnfast.scans, cnnfast.transforms; "
            "print(sorted(m for m in ('pydicom', 'nibabel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "[]"


def test_missing_pydicom_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r'pip install "cnnfast\[medical\]"'):
        scans.read_dicom_image(tmp_path / "x.dcm")
