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
from ctcovid.dicom import (
    DECODABLE_TRANSFER_SYNTAXES,
    decode_instance_hu,
    iter_hu,
    load_series,
    read_header,
    scan,
)
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
REAL_FILES = [
    "693_UNCR.dcm",
    "693_UNCI.dcm",
    "693_J2KR.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "eCT_Supplemental.dcm",
    "CT_small.dcm",
]


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


# -- real hospital data: stacks, localizers, non-HU images, padding, geometry, limits ----------

IDENTITY = dicom_fixtures.make_identity(11, 0)
MIXED_UID = dicom_fixtures.make_uid(IDENTITY.study_instance_uid, "mixed-series")


def recon(root: Path, name: str, *, n: int = 8, **kw) -> list[Path]:
    """One reconstruction of the shared series MIXED_UID, written into ``root/name``."""
    hu = np.full((n, 16, 16), -1000, np.int16)
    hu[:, 4:12, 4:12] = 40
    return dicom_fixtures.write_ct_series(
        hu, root / name, study=IDENTITY, series_instance_uid=MIXED_UID, sop_uid_seed=name, **kw
    )


def one_series(path: Path, config: IngestConfig = CONFIG):
    report = scan(path, config)
    assert len(report.series) == 1
    return report.series[0]


def edit_all(paths, **attrs) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(path)


def test_two_kernels_at_the_same_positions_are_two_stacks_never_mixed(tmp_path):
    recon(tmp_path, "lung", n=8, convolution_kernel="LUNG")
    recon(tmp_path, "soft", n=10, convolution_kernel="STANDARD")
    series = one_series(tmp_path)
    assert series.usable and len(series.stacks) == 2
    assert {ref.instance.convolution_kernel for ref in series.slices} == {"STANDARD"}
    assert series.n_slices == 10  # same thickness, both ORIGINAL: the most slices win
    assert series.stack.to_dict() == {
        "kernel": "STANDARD",
        "slice_thickness_mm": 1.25,
        "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "acquisition_number": None,
        "n_slices": 10,
    }
    assert any("stack set aside (kernel LUNG, 1.25 mm" in w for w in series.warnings)
    assert not any("share a position" in w for w in series.warnings)


def test_interleaved_thicknesses_choose_the_thinnest_within_range_by_a_changeable_rule(tmp_path):
    recon(tmp_path, "thin", n=16, slice_thickness_mm=1.25)
    recon(tmp_path, "thick", n=4, slice_thickness_mm=5.0)
    assert one_series(tmp_path).stack.slice_thickness == 1.25
    thickest = IngestConfig(min_slices=4, stack_rule="thickest")
    assert one_series(tmp_path, thickest).stack.slice_thickness == 5.0
    above_thin = IngestConfig(min_slices=4, min_thickness_mm=2.0)
    assert one_series(tmp_path, above_thin).stack.slice_thickness == 5.0


def test_original_before_derived_unless_the_rule_says_otherwise(tmp_path):
    recon(tmp_path, "orig", n=8, slice_thickness_mm=5.0)
    recon(tmp_path, "derived", n=16, image_type=("DERIVED", "SECONDARY", "AXIAL"))
    assert one_series(tmp_path).stack.image_type[0] == "ORIGINAL"
    thinnest = IngestConfig(min_slices=4, stack_rule="thinnest,most")
    assert one_series(tmp_path, thinnest).stack.image_type[0] == "DERIVED"


def test_acquisition_number_splits_repeated_volumes_only(tmp_path):
    recon(tmp_path / "repeat", "a1", acquisition_number=1)
    recon(tmp_path / "repeat", "a2", acquisition_number=2)
    repeated = one_series(tmp_path / "repeat")
    assert [st.acquisition_number for st in repeated.stacks] == [1, 2]
    assert repeated.n_slices == 8
    recon(tmp_path / "steps", "a1", acquisition_number=1, z0_mm=-200.0)
    recon(tmp_path / "steps", "a2", acquisition_number=2, z0_mm=-190.0)
    side_by_side = one_series(tmp_path / "steps")
    assert len(side_by_side.stacks) == 1 and side_by_side.n_slices == 16
    assert not any("gap" in w for w in side_by_side.warnings)


def test_stack_rule_is_validated():
    from ctcovid.errors import ConfigError

    with pytest.raises(ConfigError, match="stack_rule"):
        IngestConfig(stack_rule="newest")


def test_a_localizer_inside_the_axial_series_is_dropped_with_a_warning(tmp_path):
    info = write(tmp_path)
    scout = dicom_fixtures.write_localizer(
        info.ct_dir / "scout",
        dicom_fixtures.make_identity(3, 0),
        series_instance_uid=info.ct_series_instance_uid,
    )
    edit_all([scout], SOPInstanceUID="1.2.3.4.5.6.8")  # its own instance, not slice 1's UID
    series = one_series(info.ct_dir)
    assert series.usable and series.n_slices == 8
    assert any("1 LOCALIZER image(s) dropped" in w for w in series.warnings)


def test_a_lone_non_axial_image_is_set_aside_and_the_axial_remainder_judged(tmp_path):
    info = write(tmp_path)
    ds = pydicom.dcmread(info.paths[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    (info.ct_dir / "reformat").mkdir()
    ds.save_as(info.ct_dir / "reformat" / "coronal.dcm")
    series = one_series(info.ct_dir)
    assert series.usable and series.n_slices == 8
    assert any("stack set aside" in w and "not axial" in w for w in series.warnings)


def _rgb(ds: pydicom.Dataset) -> None:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    ds["PixelData"].VR = "OB"


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        ({"RescaleType": "US"}, "RescaleType (0028,1054) is US"),
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL", "MIP"]}, "ImageType (0008,0008)"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "PhotometricInterpretation (0028,0004)"),
        ("rgb", "SamplesPerPixel (0028,0002) is 3"),
    ],
)
def test_images_that_are_not_ct_slices_in_hu_are_refused_naming_the_attribute(
    tmp_path, change, attribute
):
    info = write(tmp_path)
    for path in info.paths:
        ds = pydicom.dcmread(path)
        if change == "rgb":
            _rgb(ds)
        else:
            for key, value in change.items():
                setattr(ds, key, value)
        ds.save_as(path)
    series = one_series(info.ct_dir)
    assert not series.usable
    assert attribute in series.reason
    with pytest.raises(InvalidInputError, match=attribute.split(" ")[0]):
        load_series(info.ct_dir, CONFIG)


def real_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not available (install pydicom-data)")
    return Path(path)


def test_real_perfusion_map_is_refused_for_its_rescale_type():
    series = one_series(real_file("eCT_Supplemental.dcm"))
    assert not series.usable
    assert "RescaleType (0028,1054) is US, not HU" in series.reason


def test_real_pixel_padding_becomes_air():
    path = real_file("693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PixelPaddingValue == -2000 and ds.RescaleIntercept == -1024
    stored = ds.pixel_array
    padding = stored == -2000
    assert padding.mean() > 0.1  # the scanner's circle of padding
    [(_, hu)] = list(iter_hu(one_series(path).slices))
    assert not (hu <= -3000).any()
    assert (hu[padding] == -1000).all()
    np.testing.assert_array_equal(hu[~padding], apply_modality_lut(stored, ds)[~padding])


def test_padding_in_the_high_bits_of_unsigned_12_bit_data_becomes_air_not_bone(tmp_path):
    info = write(tmp_path, signed=False)
    ds = pydicom.dcmread(info.paths[0])
    assert (ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept) == (12, 0, -1024)
    words = ds.pixel_array.astype(np.uint16)
    words[:4, :] = 0xF830  # the scanner's -2000 padding as a 16-bit word
    words[32, 32] = 0x0830  # a body pixel with the same low 12 bits: +1072 HU, kept
    ds.PixelData = words.astype("<u2").tobytes()
    ds.add_new(0x00280120, "US", 0xF830)  # PixelPaddingValue
    ds.save_as(info.paths[0])
    ref = next(r for r in one_series(info.ct_dir).slices if r.instance.path == info.paths[0])
    [(_, hu)] = list(iter_hu([ref]))
    assert (hu[:4] == -1000).all()
    assert hu[32, 32] == 1072


def test_padding_range_limit_covers_the_stored_values_between(tmp_path):
    info = write(tmp_path, signed=False)
    ds = pydicom.dcmread(info.paths[0])
    words = ds.pixel_array.astype(np.uint16)
    words[0, :3] = [0, 24, 25]
    ds.PixelData = words.astype("<u2").tobytes()
    ds.add_new(0x00280120, "US", 24)  # PixelPaddingValue
    ds.add_new(0x00280121, "US", 0)  # PixelPaddingRangeLimit
    ds.save_as(info.paths[0])
    ref = next(r for r in one_series(info.ct_dir).slices if r.instance.path == info.paths[0])
    [(_, hu)] = list(iter_hu([ref]))
    assert list(hu[0, :3]) == [-1000, -1000, 25 - 1024]


def test_enhanced_ct_padding_becomes_air_in_every_frame(tmp_path):
    info = write(tmp_path, enhanced=True)
    ds = pydicom.dcmread(info.paths[0])
    frames = ds.pixel_array.copy()
    frames[:, :2, :2] = -2000
    ds.PixelData = frames.astype("<i2").tobytes()
    ds.add_new(0x00280120, "SS", -2000)
    ds.save_as(info.paths[0])
    volume = hu_volume(one_series(info.ct_dir))
    assert (volume[:, :2, :2] == -1000).all()


def test_orientation_is_compared_with_a_tolerance(tmp_path):
    info = write(tmp_path)
    ds = pydicom.dcmread(info.paths[3])
    ds.ImageOrientationPatient = [1.0, 1e-7, 0.0, 0.0, 1.0, -1e-7]
    ds.save_as(info.paths[3])
    series = one_series(info.ct_dir)
    assert series.usable and len(series.stacks) == 1 and series.n_slices == 8


def test_gaps_are_warned_with_their_positions(tmp_path):
    info = write(tmp_path, n_slices=10)
    for path in info.paths[4:6]:
        path.unlink()
    series = one_series(info.ct_dir)
    assert series.usable
    gaps = [w for w in series.warnings if "gap" in w]
    assert len(gaps) == 1
    assert "1 gap(s)" in gaps[0] and "3.75 mm between z=-196.25 and z=-192.50" in gaps[0]


def test_enhanced_ct_checks_the_orientation_of_every_frame(tmp_path):
    from pydicom.dataset import Dataset

    info = write(tmp_path, enhanced=True)
    ds = pydicom.dcmread(info.paths[0])
    plane = Dataset()
    plane.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PerFrameFunctionalGroupsSequence[3].PlaneOrientationSequence = [plane]
    ds.save_as(info.paths[0])
    series = one_series(info.ct_dir)
    assert not series.usable
    assert "frame 4 ImageOrientationPatient (0020,0037)" in series.reason


# -- lost slices ---------------------------------------------------------------------------------


def _break_rle_segments(path: Path) -> None:
    """Make an RLE file's header declare 3 segments: a decode-time refusal."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    [frame] = list(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([(3).to_bytes(4, "little") + frame[4:]])
    ds.save_as(path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _lost_slices_study(tmp_path):
    if "rle" not in dicom_fixtures.available_transfer_syntaxes():
        pytest.skip("no RLE encoder here")
    info = write(tmp_path, n_slices=24, size=32, transfer_syntax="rle")
    for path in info.paths[2:6]:
        _truncate(path)  # dropped for cause at the header scan
    for path in info.paths[10:14]:
        _break_rle_segments(path)  # refused when decoded
    return info


def test_lost_slices_are_counted_named_and_make_the_label_indeterminate(tmp_path):
    from ctcovid.report.sr import evaluation_value
    from ctcovid.results import ModelInfo
    from ctcovid.scans import prepare_scan, scan_result

    info = _lost_slices_study(tmp_path)
    series = load_series(info.ct_dir, CONFIG)
    assert (series.n_slices_total, series.n_slices, series.n_slices_dropped) == (24, 20, 4)
    prepared = prepare_scan(series, CONFIG)
    assert len(prepared.all_slices) == 16
    args = {
        "threshold": 0.5,
        "classes": ("covid", "non-covid"),
        "model": ModelInfo("m", "1", "1.2.3"),
        "seconds": 0.0,
    }
    probs = np.full(len(prepared.used), 0.9)
    result = scan_result(prepared, probs, ingest=CONFIG, **args)
    assert (result.n_slices_total, result.n_slices_used, result.n_slices_lost) == (24, 16, 8)
    assert result.label == "indeterminate"
    assert result.probability_covid == pytest.approx(0.9)
    assert any("8 of 24 slice(s) lost" in w for w in result.warnings)
    named = " ".join(result.warnings)
    assert all(str(p) in named for p in info.paths[2:6] + info.paths[10:14])
    assert "RLE header declares 3 segment(s)" in named
    assert result.to_json_dict()["n_slices_lost"] == 8
    assert evaluation_value(result, indeterminate=False).value == "82334004"
    lenient = IngestConfig(min_slices=4, max_lost_fraction=0.5)
    assert scan_result(prepared, probs, ingest=lenient, **args).label == "covid"


def test_results_csv_gains_n_slices_lost_last_and_old_files_resume(tmp_path):
    from ctcovid.batch.results import ResultRow, ResultsWriter, read_results

    columns = ResultRow.columns()
    assert columns[-1] == "n_slices_lost"
    old = tmp_path / "results.csv"
    # A file of the previous version: 14 columns in the header and in every row.
    old.write_text(",".join(columns[:-1]) + "\n" + "1.2,1.2.3,p,skipped,why" + ",," * 4 + ",\n")
    with ResultsWriter(old) as writer:
        assert len(writer.rows) == 1
        writer.append(ResultRow("1.2", "1.2.4", "p", "classified", n_slices_lost=3))
    rows = read_results(old)
    assert [r.series_instance_uid for r in rows] == ["1.2.3", "1.2.4"]
    new = tmp_path / "new.csv"
    with ResultsWriter(new) as writer:
        writer.append(ResultRow("1.2", "1.2.4", "p", "classified", n_slices_lost=3))
    assert read_results(new)[0].n_slices_lost == 3


# -- decompression and header bombs ------------------------------------------------------------

_MEASURE = """
import json, resource, sys
from pathlib import Path
from ctcovid.config import IngestConfig
from ctcovid.dicom import iter_hu, scan
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
series = scan(Path(sys.argv[1]), IngestConfig(min_slices=1)).series[0]
errors = []
decoded = len(list(iter_hu(series.slices, errors))) if series.usable else 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reason": series.reason, "usable": series.usable, "decoded": decoded,
                  "errors": errors, "warnings": series.warnings, "extra_mb": (peak - base) / 1024}))
"""


def measured_scan(path: Path) -> dict:
    """Scan (and decode what is usable) in a fresh process; its peak memory above the imports."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tiny_ct(path: Path, **attrs) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = dicom_fixtures.CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3.4", "1.2.3.4.0", "CT"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [1, 1]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = bytes(128)
    ds["PixelData"].VR = "OW"
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_tiny_file_declaring_a_million_frames_is_refused_cheaply(tmp_path):
    path = _tiny_ct(tmp_path / "bomb" / "frames.dcm", NumberOfFrames=1_000_000)
    assert path.stat().st_size < 1024
    got = measured_scan(path.parent)
    assert not got["usable"]
    assert "NumberOfFrames (0028,0008) is 1000000, above the limit 5000" in got["reason"]
    assert got["extra_mb"] < 200


def test_frames_beyond_what_the_file_holds_are_refused_even_within_the_limit(tmp_path):
    series = one_series(_tiny_ct(tmp_path / "f.dcm", NumberOfFrames=4000).parent)
    assert "PixelData (7FE0,0010) holds 128" in series.reason


def test_rows_and_columns_above_the_limit_drop_the_instance_for_cause(tmp_path):
    info = write(tmp_path)
    edit_all(info.paths[:1], Rows=8192, Columns=8192)
    series = one_series(info.ct_dir)
    assert series.usable and series.n_slices_dropped == 1 and series.n_slices_total == 8
    assert "Rows (0028,0010) is 8192, above the limit 4096" in series.stack.dropped[0]
    small = IngestConfig(min_slices=4, max_rows_columns=32)
    assert "above the limit 32" in one_series(info.ct_dir, small).reason


def test_a_jpeg_ls_codestream_declaring_8192_squared_is_refused_before_decoding(tmp_path):
    if "jpegls" not in dicom_fixtures.available_transfer_syntaxes():
        pytest.skip("no JPEG-LS encoder here")
    info = write(tmp_path, n_slices=1, size=64, transfer_syntax="jpegls")
    data = bytearray(info.paths[0].read_bytes())
    sof = data.find(b"\xff\xf7")  # JPEG-LS SOF55: length, precision, rows, columns
    assert sof > 0 and data[sof + 5 : sof + 9] == (64).to_bytes(2, "big") * 2
    data[sof + 5 : sof + 9] = (8192).to_bytes(2, "big") * 2
    info.paths[0].write_bytes(bytes(data))
    assert len(data) < 16_000
    got = measured_scan(info.ct_dir)
    assert got["decoded"] == 0
    assert "codestream declares 8192 x 8192 pixels" in got["errors"][0]
    assert "Rows (0028,0010) x Columns (0028,0011) is 64 x 64" in got["errors"][0]
    assert got["extra_mb"] < 200


# -- the transfer syntaxes the ingest decodes ---------------------------------------------------


def _pillow_jpeg_baseline(path: Path) -> Path:
    """An 8-bit grayscale JPEG baseline frame made by Pillow, encapsulated in a CT header."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    img = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8) * 4
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=95)
    _tiny_ct(path, Rows=32, Columns=32, BitsAllocated=8, BitsStored=8, HighBit=7)
    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = 0
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _syntax_fixture(uid: str, tmp_path: Path) -> Path:
    """A real file in transfer syntax ``uid``: pydicom-data, the fixture writer, or Pillow."""
    from pydicom.uid import JPEGLossless

    writer = {str(u): name for name, u in dicom_fixtures.TRANSFER_SYNTAXES.items()}
    if uid in writer and writer[uid] in dicom_fixtures.available_transfer_syntaxes():
        return write(tmp_path, n_slices=1, transfer_syntax=writer[uid]).paths[0]
    if uid == "1.2.840.10008.1.2.4.50":
        return _pillow_jpeg_baseline(tmp_path / "baseline.dcm")
    names = {
        "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
        "1.2.840.10008.1.2.4.51": "JPGExtended.dcm",
        "1.2.840.10008.1.2.4.57": "JPEG-LL.dcm",  # SV1 is a process-14 codestream: relabelled
        "1.2.840.10008.1.2.4.70": "JPEG-LL.dcm",
        "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
        "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_16.dcm",
        "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
        "1.2.840.10008.1.2.4.91": "693_J2KI.dcm",
    }
    ds = pydicom.dcmread(real_file(names[uid]))
    if uid == "1.2.840.10008.1.2.4.57":
        ds.file_meta.TransferSyntaxUID = JPEGLossless
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, f"1.2.3.{len(keyword)}")
    path = tmp_path / "fixture.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("uid", sorted(DECODABLE_TRANSFER_SYNTAXES))
def test_every_decodable_transfer_syntax_decodes_a_real_file(tmp_path, uid):
    from ctcovid.dicom.limits import bounds_reason

    path = _syntax_fixture(uid, tmp_path)
    inst = read_header(path)
    assert inst.transfer_syntax_uid == uid
    assert bounds_reason(inst, IngestConfig()) == ""
    hu = decode_instance_hu(inst)  # the codestream check and the decoder both pass
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(hu.shape)
    expected = np.stack([apply_modality_lut(f, ds) for f in frames]).astype(np.float32)
    if "PixelPaddingValue" in ds:
        expected[frames == ds.PixelPaddingValue] = -1000.0
    np.testing.assert_array_equal(hu, expected)


def test_deflated_and_undecodable_syntaxes_are_not_offered():
    assert "1.2.840.10008.1.2.1.99" not in DECODABLE_TRANSFER_SYNTAXES  # Deflated
    assert "1.2.840.10008.1.2.4.110" not in DECODABLE_TRANSFER_SYNTAXES  # JPEG XL
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"} <= DECODABLE_TRANSFER_SYNTAXES


def test_enhanced_ct_with_fewer_per_frame_items_than_frames_is_refused_naming_the_frame(
    tmp_path,
):
    from ctcovid.dicom.pixels import to_hu

    info = write(tmp_path, n_slices=3, size=16, enhanced=True)
    ds = pydicom.dcmread(info.paths[0])
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:1]
    ds.save_as(info.paths[0])
    inst = read_header(info.paths[0])

    with pytest.raises(InvalidInputError) as refused:
        to_hu(np.zeros((16, 16), np.int16), inst, frame_index=2)

    assert "PerFrameFunctionalGroupsSequence (5200,9230) has 1 item(s)" in str(refused.value)
    assert "frame 3 of 3" in str(refused.value)


def test_slices_that_arrived_lossy_compressed_are_reported_in_the_warnings(tmp_path):
    """A PACS may hand over a series recompressed with loss (JPEG 2000 irreversible here): it
    is still classified, and the result says how many instances came that way."""
    from pydicom.uid import JPEG2000

    info = write(tmp_path, n_slices=6)
    for path in info.paths[:2]:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000, j2k_cr=[10])
        ds.save_as(path)
    series = load_series(info.ct_dir, CONFIG)
    assert series.usable
    lossy = [w for w in series.warnings if "lossy transfer syntax" in w]
    assert len(lossy) == 1 and "2 of 6 instance(s)" in lossy[0] and "JPEG 2000" in lossy[0]
    lossless = load_series(write(tmp_path / "other", n_slices=6).ct_dir, CONFIG)
    assert not any("lossy" in w for w in lossless.warnings)
