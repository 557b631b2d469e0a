"""The DICOM Structured Report of one classified series: a Comprehensive 3D SR, TID 1500.

The document follows the IHE AI Results profile: it files into the source study, is made by a
device observer (the model), names the model in the Contributing Equipment Sequence, lists every
analysed instance as evidence and carries one measurement group with the COVID-19 finding, its
qualitative evaluation, the probability and references to the key slices.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from ctcovid import __version__
from ctcovid.dicom.types import Instance, Series
from ctcovid.errors import ReportError
from ctcovid.report import codes
from ctcovid.report.equipment import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    add_algorithm_equipment,
)
from ctcovid.report.header import (
    apply_character_set,
    apply_time_zone,
    copy_source_modules,
    referenced_requests,
    series_description,
    source_context,
    sr_series_number,
    stack_text,
)
from ctcovid.report.uids import sr_revision_uid, sr_uids, tracking_uid
from ctcovid.report.validate import validate_sr
from ctcovid.results import ScanResult
from ctcovid.scans import KEY_SLICES, key_slice_order, stated_probability

logger = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "ctcovid COVID-19"
TRACKING_IDENTIFIER = "COVID-19 classification"
DEFAULT_KEY_SLICE_COUNT = KEY_SLICES  # the key slices the result names


def build_sr(
    result: ScanResult,
    series: Series,
    *,
    revision: int = 1,
    predecessor_sop_instance_uid: str | None = None,
    predecessor_series_instance_uid: str | None = None,
    indeterminate: bool = False,
    key_slice_count: int = DEFAULT_KEY_SLICE_COUNT,
) -> hd.sr.Comprehensive3DSR:
    """Build and validate the SR that reports ``result`` for ``series``.

    Parameters
    ----------
    result
        The scan-level result; its ``sop_instance_uids`` must all belong to ``series``.
    series
        The source series; its first instance's header gives the patient and study modules
        (copied in full), the character set, the time zone and the requests.
    revision
        1 for the first report of this series, 2, 3, ... for revised ones (for example after
        late instances arrived). Part of the SOP Instance UID, which also derives from what the
        result states and the source header (``ctcovid.report.uids``), not the ctcovid version:
        building the same report twice gives the same SOP instance, any change a new one.
    predecessor_sop_instance_uid, predecessor_series_instance_uid
        The SR this one replaces, as it was sent (PS3.3 C.17.2.3): required when
        ``revision > 1``, and only then. It is in the source study and is a Comprehensive 3D SR.
    indeterminate
        Report the finding as indeterminate instead of present/absent, for a result the caller
        does not trust. A result labelled ``indeterminate`` is reported so anyway. The
        probability is still reported.
    key_slice_count
        How many of ``result.key_slice_indices`` (highest slice probability first) to reference
        as source images of the measurement group.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The validated report.

    Raises
    ------
    ReportError
        If the result does not fit the series or the built report fails ``validate_sr``.
    ValueError
        If ``revision`` or ``key_slice_count`` is out of range, or the predecessor is missing
        for a revision (or given for a first report).
    """
    if key_slice_count < 0:
        raise ValueError(
            f"key_slice_count must be >= 0. Received: key_slice_count={key_slice_count}."
        )
    _check_predecessor(
        result.series_instance_uid,
        revision,
        predecessor_sop_instance_uid,
        predecessor_series_instance_uid,
    )
    _check_result_matches_series(result, series)
    evidence = _evidence(result, series)
    source = series.header
    # Revision 1 first; a later revision is revision 1 renumbered with its predecessor
    # (revise_sr), so that the node and batch, from a result or from a revision-1 file, build
    # the very same revision n.
    sr_series_uid, sr_sop_uid = sr_uids(
        result,
        1,
        context=(
            f"key_slice_count={key_slice_count}",
            f"indeterminate={indeterminate}",
            source_context(source),
        ),
    )

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=codes.CT_CHEST,
        imaging_measurements=[_measurement_group(result, series, indeterminate, key_slice_count)],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=sr_series_uid,
        series_number=sr_series_number(source),
        sop_instance_uid=sr_sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(SR_SERIES_DESCRIPTION, source, result),
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=f"ctcovid {__version__}",
        # highdicom accepts only some spellings of SpecificCharacterSet (not an empty first
        # value, PS3.3 C.12.1.1.2); the source's own value is set below instead.
        specific_character_set=None,
    )
    apply_character_set(sr, source)
    copy_source_modules(sr, source)
    requests = referenced_requests(source)
    if requests:
        sr.ReferencedRequestSequence = requests
    apply_time_zone(sr, source)
    add_algorithm_equipment(sr, result.model)
    if revision > 1:
        assert predecessor_sop_instance_uid and predecessor_series_instance_uid  # checked above
        _renumber(sr, revision, predecessor_sop_instance_uid, predecessor_series_instance_uid)
    validate_sr(sr, result)
    logger.debug(
        "Built SR %s (revision %d) for series %s",
        sr.SOPInstanceUID,
        revision,
        result.series_instance_uid,
    )
    return sr


def revise_sr(
    first: Dataset,
    revision: int,
    predecessor_sop_instance_uid: str,
    predecessor_series_instance_uid: str,
) -> Dataset:
    """Revision ``revision`` of the SR whose revision 1 is ``first`` (a copy; ``first`` is kept).

    The same as ``build_sr(..., revision=revision, predecessor_...)`` of the result ``first``
    reports: InstanceNumber ``revision``, the Predecessor Documents Sequence naming the SR it
    replaces (PS3.3 C.17.2.3), and the SOP Instance UID of :func:`~ctcovid.report.uids.
    sr_revision_uid`. Batch uses it to send the revision a destination needs from the SR file it
    wrote, without the source images.

    Raises
    ------
    ReportError
        If ``first`` is not a revision 1 (InstanceNumber 1, no predecessor) or the revision
        fails ``validate_sr``.
    ValueError
        If the revision is below 2 or the predecessor is missing.
    """
    series_uid = str(first.get("SeriesInstanceUID", ""))
    if first.get("InstanceNumber") != 1 or "PredecessorDocumentsSequence" in first:
        raise ReportError(
            f"SR {first.get('SOPInstanceUID', '?')} of series {series_uid} is not a revision 1 "
            "(InstanceNumber 1, no predecessor); a revision is made from revision 1 only."
        )
    if revision < 2:
        raise ValueError(f"revise_sr makes revisions 2, 3, ... Received: revision={revision}.")
    _check_predecessor(
        series_uid, revision, predecessor_sop_instance_uid, predecessor_series_instance_uid
    )
    revised = copy.deepcopy(first)
    _renumber(revised, revision, predecessor_sop_instance_uid, predecessor_series_instance_uid)
    validate_sr(revised)
    return revised


def _renumber(sr: Dataset, revision: int, predecessor_sop: str, predecessor_series: str) -> None:
    """Make revision-1 ``sr`` revision ``revision`` replacing the SR ``predecessor_sop``."""
    uid = sr_revision_uid(str(sr.SOPInstanceUID), revision, predecessor_sop)
    sr.SOPInstanceUID = uid
    meta = getattr(sr, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = uid
    sr.InstanceNumber = revision
    reference = Dataset()
    reference.ReferencedSOPClassUID = Comprehensive3DSRStorage
    reference.ReferencedSOPInstanceUID = predecessor_sop
    series_item = Dataset()
    series_item.SeriesInstanceUID = predecessor_series
    series_item.ReferencedSOPSequence = [reference]
    study_item = Dataset()
    study_item.StudyInstanceUID = sr.StudyInstanceUID
    study_item.ReferencedSeriesSequence = [series_item]
    sr.PredecessorDocumentsSequence = [study_item]


def write_sr(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (with preamble and file meta) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _check_result_matches_series(result: ScanResult, series: Series) -> None:
    if result.series_instance_uid != series.series_instance_uid:
        raise ReportError(
            f"Result is for series {result.series_instance_uid} but the source series is "
            f"{series.series_instance_uid}; cannot build its SR."
        )
    if result.study_instance_uid != series.study_instance_uid:
        raise ReportError(
            f"Series {series.series_instance_uid}: result names study "
            f"{result.study_instance_uid} but the series belongs to {series.study_instance_uid}."
        )
    n = len(result.sop_instance_uids)
    for name in ("slice_probabilities", "frame_numbers"):
        if len(getattr(result, name)) != n:
            raise ReportError(
                f"Series {series.series_instance_uid}: result has {n} sop_instance_uids but "
                f"{len(getattr(result, name))} {name}."
            )
    if n == 0:
        raise ReportError(
            f"Series {series.series_instance_uid}: the result lists no analysed instances; an SR "
            "needs evidence."
        )
    bad = [i for i in result.key_slice_indices if not 0 <= i < n]
    if bad:
        raise ReportError(
            f"Series {series.series_instance_uid}: key_slice_indices {bad} are outside the "
            f"{n} analysed slices."
        )


def _instances_by_uid(series: Series) -> dict[str, Instance]:
    return {instance.sop_instance_uid: instance for instance in series.instances}


def _evidence(result: ScanResult, series: Series) -> list[Dataset]:
    """Headers of the analysed instances, once each, in the order of the result."""
    by_uid = _instances_by_uid(series)
    evidence = []
    for uid in dict.fromkeys(result.sop_instance_uids):
        instance = by_uid.get(uid)
        if instance is None:
            raise ReportError(
                f"Series {series.series_instance_uid}: analysed instance {uid} is not among the "
                "series' instances; cannot reference it as evidence."
            )
        evidence.append(instance.header)
    return evidence


def _check_predecessor(
    series_instance_uid: str,
    revision: int,
    sop_instance_uid: str | None,
    predecessor_series_instance_uid: str | None,
) -> None:
    """A revision > 1 names the SR it replaces (both UIDs); revision 1 names none."""
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise ValueError(f"revision must be an integer >= 1. Received: revision={revision!r}.")
    if (sop_instance_uid is None) != (predecessor_series_instance_uid is None):
        raise ValueError(
            "predecessor_sop_instance_uid and predecessor_series_instance_uid go together. "
            f"Received: {sop_instance_uid!r} and {predecessor_series_instance_uid!r}."
        )
    if revision == 1:
        if sop_instance_uid is not None:
            raise ValueError(
                f"Revision 1 has no predecessor. Received: predecessor {sop_instance_uid}."
            )
        return
    if sop_instance_uid is None or predecessor_series_instance_uid is None:
        raise ValueError(
            f"Series {series_instance_uid}: revision {revision} must name the SR it "
            "replaces, as sent (predecessor_sop_instance_uid, predecessor_series_instance_uid)."
        )


def _observation_context(result: ScanResult) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result.model.device_uid,
        name=result.model.name,
        manufacturer_name=MANUFACTURER,
        model_name=result.model.name,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.OBSERVER_DEVICE,
            observer_identifying_attributes=device,
        )
    )


def algorithm_parameters(result: ScanResult) -> list[str]:
    """The settings that decide the result, as ``name=value`` texts for TID 4019."""
    return [
        f"window_center_hu={result.window_center_hu:g}",
        f"window_width_hu={result.window_width_hu:g}",
        f"threshold={result.threshold:g}",
        f"slice_policy={result.slice_policy}",
        f"runtime={result.model.runtime}",
        f"n_slices_used={result.n_slices_used}",
        f"n_slices_total={result.n_slices_total}",
        *([f"stack={stack}"] if (stack := stack_text(result)) else []),
    ]


def _algorithm_identification(result: ScanResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.model.name,
        version=result.model.version,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        manufacturer=MANUFACTURER,
        parameters=algorithm_parameters(result),
    )


def evaluation_value(result: ScanResult, indeterminate: bool) -> hd.sr.CodedConcept:
    """Present, absent or indeterminate, as the result and the caller decide."""
    if indeterminate or result.label == "indeterminate":
        return codes.INDETERMINATE
    if result.label == "covid":
        return codes.PRESENT
    if result.label == "non-covid":
        return codes.ABSENT
    raise ReportError(
        f"Series {result.series_instance_uid}: label {result.label!r} is none of 'covid', "
        "'non-covid' and 'indeterminate'."
    )


def key_slices(result: ScanResult, count: int) -> list[int]:
    """The first ``count`` key slice indices, highest stated slice probability first, ties by
    slice index (:func:`ctcovid.scans.key_slice_order`)."""
    named = set(result.key_slice_indices)
    ranked = key_slice_order(result.slice_probabilities)
    return [i for i in ranked if i in named][:count]


def _key_slice_references(
    result: ScanResult, series: Series, count: int
) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """One IMAGE item per instance holding a key slice; frame numbers for multi-frame only."""
    by_uid = _instances_by_uid(series)
    frames_by_uid: dict[str, list[int]] = {}
    for i in key_slices(result, count):
        frames_by_uid.setdefault(result.sop_instance_uids[i], []).append(result.frame_numbers[i])
    references = []
    for uid, frames in frames_by_uid.items():
        instance = by_uid[uid]
        references.append(
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=instance.sop_class_uid,
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=sorted(frames) if instance.number_of_frames > 1 else None,
            )
        )
    return references


def _measurement_group(
    result: ScanResult, series: Series, indeterminate: bool, key_slice_count: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    probability = hd.sr.Measurement(
        name=codes.PROBABILITY,
        value=stated_probability(result.probability_covid),
        unit=codes.UNIT_NO_UNITS,
    )
    evaluation = hd.sr.QualitativeEvaluation(
        name=codes.COVID_19, value=evaluation_value(result, indeterminate)
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(
                result.study_instance_uid, result.series_instance_uid, result.model.name
            ),
            identifier=TRACKING_IDENTIFIER,
        ),
        finding_type=codes.COVID_19,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LUNG)],
        algorithm_id=_algorithm_identification(result),
        measurements=[probability],
        qualitative_evaluations=[evaluation],
        source_images=_key_slice_references(result, series, key_slice_count) or None,
    )
