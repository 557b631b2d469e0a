"""Preprocessing: lung window, pad to square, area resize, lung slice policy."""

from __future__ import annotations

import numpy as np
import pytest

import dicom_fixtures
from ctcovid.config import IngestConfig
from ctcovid.dicom import load_series
from ctcovid.errors import ConfigError
from ctcovid.preprocess import (
    area_resize,
    lung_fraction,
    lung_window,
    pad_to_square,
    preprocess_series,
    resize_uint8,
    select_slices,
    window_slice,
)


def test_lung_window_maps_edges_and_clips():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    np.testing.assert_allclose(lung_window(hu, -600, 1500), [0, 0, 127.5, 255, 255])


def test_window_is_configurable():
    out = lung_window(np.array([40.0]), center_hu=40, width_hu=400)
    np.testing.assert_allclose(out, [127.5])


def test_pad_to_square_centres_the_image():
    img = np.ones((2, 4), np.float32)
    out = pad_to_square(img, fill=0.0)
    assert out.shape == (4, 4)
    np.testing.assert_array_equal(out[1:3], 1)
    assert out[0].sum() == 0 and out[3].sum() == 0


def test_area_resize_averages_blocks():
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(area_resize(img, 2), [[2.5, 4.5], [10.5, 12.5]])


def test_area_resize_non_integer_factor_preserves_mean():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (300, 300)).astype(np.float32)
    out = area_resize(img, 256)
    assert out.shape == (256, 256)
    assert abs(out.mean() - img.mean()) < 0.5


def test_window_slice_gives_uint8_of_the_configured_size():
    hu = np.full((100, 80), -850.0)
    out = window_slice(hu, IngestConfig(image_size=32))
    assert out.dtype == np.uint8 and out.shape == (32, 32)


def test_resize_uint8_handles_rgb_jpgs_of_any_size():
    rgb = np.zeros((50, 70, 3), np.uint8)
    rgb[..., :] = 200
    out = resize_uint8(rgb, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out.max() == 200


@pytest.fixture(scope="module")
def margin_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("margin")
    spec = dicom_fixtures.StudySpec(positive=False, n_slices=10, size=64, lung_margin_slices=3)
    return dicom_fixtures.write_study(out, spec, seed=5)


def test_preprocess_series_is_ordered_and_identified(margin_study):
    config = IngestConfig(image_size=64, min_slices=4)
    series = load_series(margin_study.ct_dir, config)
    pp = preprocess_series(series, config)
    assert pp.slices.shape == (16, 64, 64)
    assert list(pp.z_mm) == sorted(pp.z_mm)
    assert pp.sop_instance_uids == [r.sop_instance_uid for r in series.slices]
    expected = np.stack([window_slice(h.astype(float), config) for h in margin_study.hu])
    np.testing.assert_array_equal(pp.slices, expected)


def test_lung_policy_drops_slices_without_lung(margin_study):
    config = IngestConfig(image_size=64, min_slices=4, slice_policy="lung")
    series = load_series(margin_study.ct_dir, config)
    pp = preprocess_series(series, config)
    fractions = [lung_fraction(s, config) for s in pp.slices]
    assert max(fractions[:3] + fractions[-3:]) < config.lung_min_fraction
    idx, warnings = select_slices(pp.slices, config)
    assert not warnings
    assert list(idx) == list(range(3, 13))


def test_max_slices_samples_evenly_along_z():
    slices = np.zeros((10, 8, 8), np.uint8)
    idx, _ = select_slices(slices, IngestConfig(max_slices=4))
    assert list(idx) == [0, 3, 6, 9]


def test_invalid_settings_name_the_value():
    with pytest.raises(ConfigError, match="slice_policy"):
        IngestConfig(slice_policy="middle")
    with pytest.raises(ConfigError, match="window_width_hu"):
        IngestConfig(window_width_hu=0)
