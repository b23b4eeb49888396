"""Radiology preprocessing (cnnfast.transforms): windows and intensity scaling against
hand-computed values and MONAI, resampling against scipy.ndimage.zoom and a sphere whose place is
known, region-of-interest crops, and the JSON recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from cnnfast import transforms as T


def hu_volume(shape=(9, 11, 8), seed=0):
    return np.random.default_rng(seed).uniform(-1500, 2500, shape).astype(np.float32)


# --- windows and intensities --------------------------------------------------------------------

def test_presets_are_the_usual_ct_windows():
    assert T.WINDOWS == {"lung": (-600, 1500), "mediastinum": (40, 400), "bone": (400, 1800),
                         "brain": (40, 80)}


def test_window_by_hand():
    hu = np.array([-2000, -1350, -975, -600, 0, 150, 1000], np.float32)
    # lung: -600 +- 750 -> [-1350, 150]
    np.testing.assert_allclose(T.window(hu, "lung"), [0, 0, 0.25, 0.5, 0.9, 1, 1], atol=1e-7)
    # brain: 40 +- 40 -> [0, 80]
    np.testing.assert_allclose(T.window(np.array([-5, 0, 20, 40, 80, 90.0]), 40, 80),
                               [0, 0, 0.25, 0.5, 1, 1], atol=1e-7)
    assert T.window(hu, "bone").dtype == np.float32
    assert T.window_bounds("mediastinum") == (-160.0, 240.0)


@pytest.mark.parametrize("preset", sorted(T.WINDOWS))
def test_window_matches_monai_scale_intensity_range(preset):
    monai = pytest.importorskip("monai.transforms")
    hu = hu_volume()
    low, high = T.window_bounds(preset)
    expected = monai.ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0,
                                         clip=True)(hu[None])
    np.testing.assert_allclose(T.window(hu, preset), np.asarray(expected)[0], atol=1e-6)
    got = T.Window(preset)(hu[None, None])
    np.testing.assert_allclose(got[0, 0], np.asarray(expected)[0], atol=1e-6)


def test_scale_intensity_range_without_clip_by_hand():
    out = T.scale_intensity_range(np.array([-10.0, 0, 10, 20]), 0, 10, -1, 1, clip=False)
    np.testing.assert_allclose(out, [-3, -1, 1, 3])


def test_zscore_and_percentiles_match_monai():
    monai = pytest.importorskip("monai.transforms")
    x = hu_volume()
    np.testing.assert_allclose(T.zscore(x), np.asarray(monai.NormalizeIntensity()(x[None]))[0],
                               atol=1e-5)
    expected = monai.ScaleIntensityRangePercentiles(lower=2, upper=98, b_min=0, b_max=1,
                                                    clip=True)(x[None])
    np.testing.assert_allclose(T.percentile_scale(x, 2, 98), np.asarray(expected)[0], atol=1e-5)


def test_zscore_and_percentiles_by_hand():
    x = np.array([1.0, 2, 3, 4, 5])
    np.testing.assert_allclose(T.zscore(x), (x - 3) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(T.percentile_scale(x, 25, 75), [0, 0, 0.5, 1, 1])
    assert not T.zscore(np.full(4, 7.0)).any() and not T.percentile_scale(np.ones(3)).any()
    batch = np.stack([x.reshape(1, 1, 5) * k for k in (1, 10)])[:, None]  # (2, 1, 1, 1, 5)
    got = T.ZScore()(batch)
    np.testing.assert_allclose(got[0], got[1], rtol=1e-6)  # each image on its own


@pytest.mark.parametrize("call, match", [
    (lambda: T.window(np.zeros(3), "liver"), "unknown preset 'liver'"),
    (lambda: T.window(np.zeros(3), 40, 0), "width must be a positive"),
    (lambda: T.window(np.zeros(3), "lung", 100), "sets its own width"),
    (lambda: T.percentile_scale(np.zeros(3), 60, 40), "lower < upper"),
    (lambda: T.scale_intensity_range(np.zeros(3), 1, 1), "a_min < a_max"),
])
def test_bad_intensity_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- resampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, target", [((2.0, 1.0, 1.5), (1.0, 1.0, 0.5)),
                                             ((1.0, 0.5, 1.0), (2.0, 1.0, 1.0))])
def test_resample_matches_scipy_zoom(spacing, target):
    x = hu_volume((6, 10, 8))
    factors = np.array(spacing) / np.array(target)
    expected = ndimage.zoom(x, factors, order=1, grid_mode=True, mode="nearest")
    got = T.resample(x, spacing, target, antialias=False)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_resample_antialias_is_a_gaussian_before_zoom():
    x = hu_volume((12, 12))
    sigma = (2.0 - 1) / 2
    expected = ndimage.zoom(ndimage.gaussian_filter(x, sigma, mode="nearest"), 0.5, order=1,
                            grid_mode=True, mode="nearest")
    np.testing.assert_allclose(T.resample(x, 1.0, 2.0), expected, atol=1e-3)
    up = hu_volume((5, 4))  # growing axes are never smoothed
    np.testing.assert_allclose(T.resample(up, 1.0, 0.5),
                               ndimage.zoom(up, 2, order=1, grid_mode=True, mode="nearest"),
                               atol=1e-3)


def test_resample_shapes_and_nearest_keeps_labels():
    mask = np.zeros((10, 7), np.float32)
    mask[3:6, 2:5] = 3
    out = T.resample(mask, (1.5, 0.7), 1.0, order=0)
    assert out.shape == (15, 5) and set(np.unique(out)) == {0.0, 3.0}
    with pytest.raises(ValueError, match="target_spacing"):
        T.resample(mask, 1.0, (1.0, 0.0))
    with pytest.raises(ValueError, match="order"):
        T.resample(mask, 1.0, 1.0, order=2)


def test_a_sphere_lands_where_the_affine_says():
    from scipy.ndimage import center_of_mass

    spacing = np.array([2.5, 0.8, 1.3])
    shape = (20, 60, 40)
    origin = np.array([10.0, -20.0, 5.0])
    center = origin + np.array([23.0, 21.3, 25.1])  # mm, off every grid
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    idx = np.indices(shape).reshape(3, -1).T
    distance = np.linalg.norm(idx * spacing + origin - center, axis=1).reshape(shape)
    ball = np.clip(6.0 - distance, 0, 1).astype(np.float32)  # radius 6 mm, soft edge
    target = (1.0, 1.0, 1.0)
    out = T.resample(ball, spacing, target)
    new_affine = T.resampled_affine(affine, spacing, target, shape)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), target)
    expected_voxel = np.linalg.solve(new_affine, [*center, 1])[:3]
    np.testing.assert_allclose(center_of_mass(out), expected_voxel, atol=0.15)


# --- regions of interest and fitting ------------------------------------------------------------

def test_body_box_drops_air_and_the_table():
    ct = np.full((30, 40), -1000.0, np.float32)
    ct[5:20, 8:33] = 40  # the body
    ct[25:27, 2:38] = 200  # the table, apart from the body
    assert T.body_box(ct) == ((5, 20), (8, 33))
    assert T.body_box(ct, margin=3) == ((2, 23), (5, 36))
    assert T.body_box(np.full((4, 4), -1000.0)) == ((0, 4), (0, 4))


def test_crop_and_pad_by_hand():
    x = np.arange(20.0).reshape(4, 5)
    np.testing.assert_array_equal(T.crop_box(x, ((1, 3), (0, 2))), [[5, 6], [10, 11]])
    with pytest.raises(ValueError, match="box"):
        T.crop_box(x, ((1, 5), (0, 2)))
    out = T.pad_or_crop(x, (6, 3))
    assert out.shape == (6, 3)
    np.testing.assert_array_equal(out[0], [0, 0, 0])  # padded with the minimum
    np.testing.assert_array_equal(out[1:5], x[:, 1:4])  # 5 -> 3 crops one from each end
    np.testing.assert_array_equal(T.pad_or_crop(x, (4, 2))[0], [1, 2])  # 5 -> 2: extra at end
    np.testing.assert_array_equal(T.pad_or_crop(x, (5, 5), value=-1)[4], [-1] * 5)
    batch = T.PadOrCrop((6, 3))(x[None, None])
    np.testing.assert_array_equal(batch[0, 0], out)


# --- the recipe ---------------------------------------------------------------------------------

def test_recipe_is_the_chain_of_its_steps():
    ct = hu_volume((12, 30, 26))
    ct[:, :4] = -1000  # air above the body
    recipe = T.Preprocessing(size=(8, 16, 16), spacing=(2.0, 1.5, 1.5), roi="body",
                             window="mediastinum", fit="pad")
    x = T.resample(ct, (1.0, 1.0, 1.2), (2.0, 1.5, 1.5))
    x = T.crop_box(x, T.body_box(x, -500))
    expected = T.pad_or_crop(T.window(x, "mediastinum"), (8, 16, 16))
    np.testing.assert_array_equal(recipe.apply(ct, (1.0, 1.0, 1.2)), expected)
    resized = T.Preprocessing(size=(5, 7), intensity="zscore", fit="resize")
    np.testing.assert_allclose(resized.apply(ct[0], (1, 1)),
                               T.resize(T.zscore(ct[0])[None, None], (5, 7))[0, 0])


def test_recipe_round_trips_through_json():
    recipe = T.Preprocessing(size=(4, 5, 6), spacing=1.5, roi=((0, 3), (1, 4), (2, 6)),
                             intensity="percentile", percentiles=(1, 99), window=(40, 400))
    back = T.Preprocessing.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert back == recipe and back.spacing == (1.5, 1.5, 1.5)
    ct = hu_volume((6, 7, 8))
    np.testing.assert_array_equal(back.apply(ct, (1, 1, 1)), recipe.apply(ct, (1, 1, 1)))


@pytest.mark.parametrize("kwargs, match", [
    ({"size": (4,)}, "size"),
    ({"size": (4, 4), "spacing": (1, 1, 1)}, "spacing"),
    ({"size": (4, 4), "intensity": "hu"}, "intensity"),
    ({"size": (4, 4), "window": "liver"}, "unknown preset"),
    ({"size": (4, 4), "roi": ((0, 2),)}, "roi"),
    ({"size": (4, 4), "fit": "stretch"}, "fit"),
])
def test_bad_recipes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.Preprocessing(**kwargs)


def test_recipe_refuses_the_wrong_rank_and_keys():
    with pytest.raises(ValueError, match="3D images"):
        T.Preprocessing(size=(4, 4, 4)).apply(np.zeros((5, 5)), (1, 1))
    with pytest.raises(ValueError, match="unknown keys"):
        T.Preprocessing.from_dict({"size": [4, 4], "colour": "red"})
