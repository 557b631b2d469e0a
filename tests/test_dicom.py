"""Ingest: header scan, grouping, usability, slice order and HU on fixtures and real CT files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

import dicom_fixtures
from ctcovid.config import IngestConfig
from ctcovid.dicom import iter_hu, load_series, scan
from ctcovid.errors import InvalidInputError

CONFIG = IngestConfig(min_slices=4)


def write(tmp_path: Path, seed: int = 3, **spec) -> dicom_fixtures.StudyInfo:
    base = {"positive": True, "n_slices": 8, "size": 64}
    return dicom_fixtures.write_study(
        tmp_path / "study", dicom_fixtures.StudySpec(**(base | spec)), seed=seed
    )


def hu_volume(series) -> np.ndarray:
    return np.stack([hu for _, hu in iter_hu(series.slices)])


@pytest.mark.parametrize("syntax", dicom_fixtures.available_transfer_syntaxes())
def test_every_transfer_syntax_decodes_to_the_phantom_hu(tmp_path, syntax):
    info = write(tmp_path, transfer_syntax=syntax)
    series = load_series(info.ct_dir, CONFIG)
    np.testing.assert_allclose(hu_volume(series), info.hu, atol=0.5)


@pytest.mark.parametrize(
    ("signed", "slope", "intercept"),
    [(True, 1.0, None), (False, 1.0, None), (False, 0.5, -1024.0), (True, 2.0, -10.0)],
)
def test_hu_through_modality_lut_for_signed_unsigned_and_slopes(tmp_path, signed, slope, intercept):
    info = write(tmp_path, signed=signed, rescale_slope=slope, rescale_intercept=intercept)
    series = load_series(info.ct_dir, CONFIG)
    for ref, hu in iter_hu(series.slices):
        ds = pydicom.dcmread(ref.instance.path)
        np.testing.assert_array_equal(hu, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    np.testing.assert_allclose(hu_volume(series), info.hu, atol=slope / 2 + 1e-6)


def test_order_by_position_despite_shuffled_names_and_reversed_instance_numbers(tmp_path):
    info = write(tmp_path, shuffle_names=True, reverse_instance_numbers=True)
    series = load_series(info.ct_dir, CONFIG)
    z = [ref.z_mm for ref in series.slices]
    assert series.ordering == "position"
    assert z == sorted(z)
    numbers = [ref.instance.instance_number for ref in series.slices]
    assert numbers == sorted(numbers, reverse=True)
    np.testing.assert_array_equal(hu_volume(series), info.hu)


def test_missing_position_falls_back_to_instance_number_and_says_so(tmp_path):
    info = write(tmp_path)
    victim = info.paths[3]
    ds = pydicom.dcmread(victim)
    del ds.ImagePositionPatient
    ds.save_as(victim)
    series = load_series(info.ct_dir, CONFIG)
    assert series.ordering == "instance_number"
    assert any("ImagePositionPatient" in w and "InstanceNumber" in w for w in series.warnings)
    assert [r.instance.instance_number for r in series.slices] == list(range(1, 9))


def test_enhanced_multiframe_ct_per_frame_positions_and_hu(tmp_path):
    info = write(tmp_path, enhanced=True, reverse_instance_numbers=True)
    series = load_series(info.ct_dir, CONFIG)
    assert series.n_instances == 1
    assert series.n_slices == 8
    assert [r.z_mm for r in series.slices] == sorted(r.z_mm for r in series.slices)
    np.testing.assert_allclose(hu_volume(series), info.hu, atol=0.5)
    assert {r.frame_number for r in series.slices} == set(range(1, 9))


def test_localizer_mr_and_junk_are_reported_not_fatal(tmp_path):
    info = write(tmp_path, add_localizer=True, add_mr_series=True, add_junk=True)
    report = scan(info.study_dir, CONFIG)
    by_modality = {}
    for s in report.series:
        by_modality.setdefault(s.modality, []).append(s)
    usable = [s for s in report.series if s.usable]
    assert [s.series_instance_uid for s in usable] == [info.ct_series_instance_uid]
    reasons = {s.reason for s in report.series if not s.usable}
    assert any("LOCALIZER" in r for r in reasons)
    assert any("modality MR" in r for r in reasons)
    bad = {p.path.name: p.reason for p in report.bad_files}
    assert any("not a DICOM" in r for r in bad.values())
    # the duplicate file counts once
    ct = usable[0]
    assert ct.duplicates == 1
    # files without pixel data or truncated are dropped for cause from the headers, by path
    assert (ct.n_slices, ct.n_slices_dropped, ct.n_slices_total) == (8, 2, 10)
    dropped = "; ".join(ct.stack.dropped)
    assert f"{info.junk['no_pixel_data']}: lacks PixelData (7FE0,0010)" in dropped
    assert f"{info.junk['truncated']}: PixelData (7FE0,0010) declares" in dropped
    assert any("2 instance(s) (2 slice(s)) dropped for cause" in w for w in ct.warnings)
    assert len(list(iter_hu(ct.slices))) == 8


def test_load_series_picks_the_ct_series_among_others(tmp_path):
    info = write(tmp_path, add_localizer=True, add_mr_series=True)
    series = load_series(info.study_dir, CONFIG)
    assert series.series_instance_uid == info.ct_series_instance_uid


def test_two_usable_series_is_ambiguous_and_names_them(tmp_path):
    a = write(tmp_path / "a")
    b = write(tmp_path / "b", seed=4, positive=False)
    both = tmp_path / "both"
    shutil.copytree(a.ct_dir, both / "a")
    shutil.copytree(b.ct_dir, both / "b")
    with pytest.raises(InvalidInputError) as exc:
        load_series(both, CONFIG)
    assert a.ct_series_instance_uid in str(exc.value)
    assert b.ct_series_instance_uid in str(exc.value)


def test_too_few_slices_is_unusable_for_classification_but_convertible(tmp_path):
    info = write(tmp_path, n_slices=3)
    report = scan(info.ct_dir, CONFIG)
    assert not report.series[0].usable
    assert report.series[0].reason.startswith("too few slices")
    with pytest.raises(InvalidInputError, match="too few slices"):
        load_series(info.ct_dir, CONFIG)
    assert load_series(info.ct_dir, CONFIG, for_classification=False).n_slices == 3


def test_non_axial_series_is_unusable(tmp_path):
    info = write(tmp_path)
    for path in info.paths:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
        ds.save_as(path)
    series = scan(info.ct_dir, CONFIG).series[0]
    assert not series.usable
    assert "not axial" in series.reason


def test_inconsistent_rows_is_unusable(tmp_path):
    info = write(tmp_path)
    ds = pydicom.dcmread(info.paths[0])
    ds.Rows = 32
    ds.save_as(info.paths[0])
    series = scan(info.ct_dir, CONFIG).series[0]
    assert "inconsistent Rows" in series.reason


def test_folder_without_dicom_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match="no DICOM series found"):
        load_series(tmp_path, CONFIG)


# Real CT files shipped with pydicom (and pydicom-data): uncompressed, JPEG 2000, enhanced.
REAL_FILES = ["693_UNCI.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm", "CT_small.dcm"]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_ct_files_decode_to_hu_like_pydicom(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not available (install pydicom-data)")
    series = scan(path, CONFIG).series[0]
    assert series.modality == "CT"
    ds = pydicom.dcmread(path)
    decoded = [hu for _, hu in iter_hu(series.slices)]
    frames = ds.pixel_array if int(ds.get("NumberOfFrames", 1)) > 1 else ds.pixel_array[None]
    assert len(decoded) == len(frames)
    if "RescaleSlope" in ds:
        expected = [apply_modality_lut(f, ds) for f in frames]
    else:  # enhanced CT: rescale in the functional groups
        groups = ds.SharedFunctionalGroupsSequence[0]
        if "PixelValueTransformationSequence" in groups:
            item = groups.PixelValueTransformationSequence[0]
            expected = [apply_modality_lut(f, item) for f in frames]
        else:
            expected = [
                apply_modality_lut(
                    f, ds.PerFrameFunctionalGroupsSequence[i].PixelValueTransformationSequence[0]
                )
                for i, f in enumerate(frames)
            ]
    if "PixelPaddingValue" in ds:  # padding becomes air (PS3.3 C.7.5.1.1.2)
        expected = [
            np.where(f == ds.PixelPaddingValue, -1000.0, e)
            for f, e in zip(frames, expected, strict=True)
        ]
    # order may differ from storage order: compare as a set of slices
    got = sorted(float(h.sum()) for h in decoded)
    want = sorted(float(np.asarray(e, np.float32).sum()) for e in expected)
    np.testing.assert_allclose(got, want, rtol=1e-6)
