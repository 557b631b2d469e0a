"""Reading a ctcovid SR back: its summary, and the checks made before it leaves the process.

The checks run on the encoded bytes read back with pydicom, so they see what PACS will see,
not the in-memory objects that built it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from ctcovid.errors import ReportError
from ctcovid.report import codes
from ctcovid.results import ScanResult
from ctcovid.scans import stated_probability

_EVALUATIONS = {
    codes.PRESENT.value: "present",
    codes.ABSENT.value: "absent",
    codes.INDETERMINATE.value: "indeterminate",
}
# DS values carry about 16 significant characters; a probability must survive that.
_PROBABILITY_TOLERANCE = 1e-9


def roundtrip(ds: Dataset) -> Dataset:
    """Encode ``ds`` as a Part 10 file in memory and read it back.

    Raises
    ------
    ReportError
        If pydicom cannot encode or decode it.
    """
    buffer = BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
        return pydicom.dcmread(BytesIO(buffer.getvalue()))
    except Exception as exc:  # any failure here means the SR cannot be sent as it is
        uid = ds.get("SOPInstanceUID", "(no SOPInstanceUID)")
        raise ReportError(f"SR {uid} cannot be encoded and read back: {exc}") from exc


def _concept(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str] | None:
    seq = item.get(keyword)
    if not seq:
        return None
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def _key(code: Dataset) -> tuple[str, str]:
    return str(code.value), str(code.scheme_designator)


def iter_content(items: Any) -> Iterator[Dataset]:
    """Every content item below ``items``, depth first."""
    for item in items or []:
        yield item
        yield from iter_content(item.get("ContentSequence"))


def _measurement_groups(ds: Dataset) -> list[Dataset]:
    return [
        item
        for item in iter_content(ds.get("ContentSequence"))
        if item.get("ValueType") == "CONTAINER" and _concept(item) == _key(codes.MEASUREMENT_GROUP)
    ]


def _children(group: Dataset, value_type: str, name: Dataset) -> list[Dataset]:
    return [
        item
        for item in group.get("ContentSequence", [])
        if item.get("ValueType") == value_type and _concept(item) == _key(name)
    ]


def _evidence_uids(ds: Dataset) -> list[str]:
    return [
        str(ref.ReferencedSOPInstanceUID)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedSOPSequence", [])
    ]


def _image_reference_uids(ds: Dataset) -> list[str]:
    return [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in iter_content(ds.get("ContentSequence"))
        if item.get("ValueType") == "IMAGE" and item.get("ReferencedSOPSequence")
    ]


def _algorithm_device_uids(ds: Dataset) -> list[str]:
    return [
        str(item.DeviceUID)
        for item in ds.get("ContributingEquipmentSequence", [])
        if "DeviceUID" in item
        and item.get("PurposeOfReferenceCodeSequence")
        and _concept(item, "PurposeOfReferenceCodeSequence") == _key(codes.PROCESSING_ALGORITHM)
    ]


def sr_summary(ds: Dataset) -> dict[str, Any]:
    """The result an SR reports, as plain JSON-ready values (``None`` where absent)."""
    groups = _measurement_groups(ds)
    finding = evaluation = probability = None
    key_slice_uids: list[str] = []
    if groups:
        group = groups[0]
        findings = _children(group, "CODE", codes.FINDING)
        if findings:
            finding = str(findings[0].ConceptCodeSequence[0].CodeMeaning)
        evaluations = _children(group, "CODE", codes.COVID_19)
        if evaluations:
            evaluation = _EVALUATIONS.get(str(evaluations[0].ConceptCodeSequence[0].CodeValue))
        numbers = _children(group, "NUM", codes.PROBABILITY)
        if numbers and numbers[0].get("MeasuredValueSequence"):
            probability = float(numbers[0].MeasuredValueSequence[0].NumericValue)
        key_slice_uids = [
            str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in group.get("ContentSequence", [])
            if item.get("ValueType") == "IMAGE"
        ]
    devices = _algorithm_device_uids(ds)
    return {
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")) or None,
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")) or None,
        "revision": int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None,
        "finding": finding,
        "evaluation": evaluation,
        "probability_covid": probability,
        "device_uid": devices[0] if devices else None,
        "evidence_sop_instance_uids": _evidence_uids(ds),
        "key_slice_sop_instance_uids": key_slice_uids,
        "predecessor_sop_instance_uids": [
            str(ref.ReferencedSOPInstanceUID)
            for study in ds.get("PredecessorDocumentsSequence", [])
            for series in study.get("ReferencedSeriesSequence", [])
            for ref in series.get("ReferencedSOPSequence", [])
        ],
    }


def validate_sr(ds: Dataset, result: ScanResult | None = None) -> None:
    """Check that ``ds`` is a complete ctcovid SR, and that it reports ``result`` if given.

    The dataset is encoded and read back first. Checked: SOP class (Comprehensive 3D SR),
    CompletionFlag COMPLETE, VerificationFlag UNVERIFIED, TID 1500 root, non-empty evidence,
    one measurement group with the COVID-19 finding, its qualitative evaluation and a
    probability in [0, 1], image references that are all in the evidence, and an algorithm
    Contributing Equipment item with a Device UID. With ``result``: same study, evidence equal
    to the analysed instances, the same stated probability and device UID.

    Raises
    ------
    ReportError
        Naming the SR and every problem found.
    """
    read = roundtrip(ds)
    problems = _problems(read, result)
    if problems:
        uid = read.get("SOPInstanceUID", "(no SOPInstanceUID)")
        raise ReportError(f"SR {uid} failed validation: " + "; ".join(problems) + ".")


def _problems(ds: Dataset, result: ScanResult | None) -> list[str]:
    problems = []
    if ds.get("SOPClassUID") != Comprehensive3DSRStorage:
        problems.append(
            f"SOPClassUID is {ds.get('SOPClassUID')}, not Comprehensive 3D SR "
            f"{Comprehensive3DSRStorage}"
        )
    if ds.get("Modality") != "SR":
        problems.append(f"Modality is {ds.get('Modality')!r}, not 'SR'")
    if ds.get("CompletionFlag") != "COMPLETE":
        problems.append(f"CompletionFlag is {ds.get('CompletionFlag')!r}, not 'COMPLETE'")
    if ds.get("VerificationFlag") != "UNVERIFIED":
        problems.append(f"VerificationFlag is {ds.get('VerificationFlag')!r}, not 'UNVERIFIED'")
    templates = ds.get("ContentTemplateSequence") or []
    if not templates or templates[0].get("TemplateIdentifier") != "1500":
        problems.append("the root container is not TID 1500 (ContentTemplateSequence)")

    summary = sr_summary(ds)
    evidence = summary["evidence_sop_instance_uids"]
    if not evidence:
        problems.append("CurrentRequestedProcedureEvidenceSequence is missing or empty")
    groups = _measurement_groups(ds)
    if len(groups) != 1:
        problems.append(f"expected one Measurement Group, found {len(groups)}")
    if summary["finding"] is None:
        problems.append("the measurement group lacks the Finding (DCM 121071) COVID-19 item")
    if summary["evaluation"] is None:
        problems.append(
            "the measurement group lacks the qualitative evaluation of COVID-19 "
            "(SCT 840539006) as present, absent or indeterminate"
        )
    probability = summary["probability_covid"]
    if probability is None:
        problems.append("the measurement group lacks the Probability (DCM 122157) NUM item")
    elif not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        problems.append(f"Probability {probability} is outside [0, 1]")
    unreferenced = set(_image_reference_uids(ds)) - set(evidence)
    if unreferenced:
        problems.append(
            f"image items reference instances not in the evidence: {sorted(unreferenced)}"
        )
    if summary["device_uid"] is None:
        problems.append(
            "ContributingEquipmentSequence has no 'Processing Algorithm' item with a DeviceUID"
        )

    if result is not None:
        if ds.get("StudyInstanceUID") != result.study_instance_uid:
            problems.append(
                f"StudyInstanceUID {ds.get('StudyInstanceUID')} differs from the source study "
                f"{result.study_instance_uid}"
            )
        analysed = set(result.sop_instance_uids)
        if evidence and set(evidence) != analysed:
            missing = sorted(analysed - set(evidence))
            extra = sorted(set(evidence) - analysed)
            problems.append(
                f"evidence differs from the analysed instances (missing {missing}, extra {extra})"
            )
        if len(evidence) != len(set(evidence)):
            problems.append("the evidence lists an instance more than once")
        stated = stated_probability(result.probability_covid)
        if probability is not None and not math.isclose(
            probability, stated, abs_tol=_PROBABILITY_TOLERANCE
        ):
            problems.append(f"Probability {probability} differs from the result's stated {stated}")
        if summary["device_uid"] is not None and summary["device_uid"] != result.model.device_uid:
            problems.append(
                f"algorithm DeviceUID {summary['device_uid']} differs from the model's "
                f"{result.model.device_uid}"
            )
    return problems
