"""Header-only scan of a folder tree: find DICOM instances and group them into series.

Nothing here decodes pixels. Files that are not DICOM or are broken are reported with their path
and a reason, never raised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag

from ctcovid.dicom.modules import REPORT_HEADER_KEYWORDS
from ctcovid.dicom.types import BadFile, Instance, Series

logger = logging.getLogger(__name__)

# Everything the ingest, the SR (patient and study modules) and the node need; nothing else is
# parsed, which keeps a header scan of a large archive cheap.
HEADER_TAGS: list[str] = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "InstanceNumber",
    "ImageType",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "ConvolutionKernel",
    "AcquisitionNumber",
    "VolumeBasedCalculationTechnique",
    # patient, study and series modules, copied into the SR
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Manufacturer",
    "SpecificCharacterSet",
]
# The report copies the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical
# Trial Study modules in full (ctcovid.dicom.modules), so the scan reads all of them.
HEADER_TAGS += [kw for kw in REPORT_HEADER_KEYWORDS if kw not in HEADER_TAGS]
# The same as tags: dcmread converts every keyword of ``specific_tags`` on every call, which was a
# third of the header scan's time; a BaseTag passes through unconverted.
_HEADER_TAG_LIST: list[BaseTag] = [Tag(kw) for kw in HEADER_TAGS]


@dataclass
class ScanReport:
    """What a scan found: series (not yet assessed) and the files it skipped."""

    series: list[Series] = field(default_factory=list)
    bad_files: list[BadFile] = field(default_factory=list)
    n_files: int = 0


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (or ``root`` itself), in a stable order."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        seq = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return tuple(seq) if len(seq) == n else None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _enhanced_geometry(
    ds: Dataset,
) -> tuple[tuple[float, float] | None, tuple[float, ...] | None, float | None]:
    """Pixel spacing, orientation and thickness of an enhanced image from its functional groups."""
    spacing = orientation = thickness = None
    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        groups.append(per_frame[0])
    for group in groups:
        measures = group.get("PixelMeasuresSequence")
        if measures and spacing is None:
            spacing = _floats(measures[0].get("PixelSpacing"), 2)
            thickness = _float_or_none(measures[0].get("SliceThickness"))
        plane = group.get("PlaneOrientationSequence")
        if plane and orientation is None:
            orientation = _floats(plane[0].get("ImageOrientationPatient"), 6)
    return spacing, orientation, thickness  # type: ignore[return-value]


def _kernel(ds: Dataset) -> str:
    """ConvolutionKernel, at the top level or (enhanced CT) in the CT Reconstruction group."""
    value = ds.get("ConvolutionKernel")
    if value in (None, "") and ("SharedFunctionalGroupsSequence" in ds):
        for kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            groups = ds.get(kw)
            recon = groups[0].get("CTReconstructionSequence") if groups else None
            if recon and recon[0].get("ConvolutionKernel") not in (None, ""):
                value = recon[0].ConvolutionKernel
                break
    if value in (None, ""):
        return ""
    if isinstance(value, str):
        return value.strip()
    return "\\".join(str(v).strip() for v in value)  # type: ignore[attr-defined]


def _float_or_none(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def instance_from_header(path: Path, ds: Dataset) -> Instance:
    """Build an :class:`Instance` from a header dataset; raises ``ValueError`` naming what lacks."""
    missing = [
        kw for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if kw not in ds
    ]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    transfer_syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    spacing = _floats(ds.get("PixelSpacing"), 2)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    thickness = _float_or_none(ds.get("SliceThickness"))
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        e_spacing, e_orientation, e_thickness = _enhanced_geometry(ds)
        spacing = spacing or e_spacing  # type: ignore[assignment]
        orientation = orientation or e_orientation  # type: ignore[assignment]
        thickness = thickness if thickness is not None else e_thickness
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return Instance(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=sop_class,
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")),
        transfer_syntax_uid=transfer_syntax,
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        image_position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        image_orientation=orientation,  # type: ignore[arg-type]
        slice_thickness=thickness,
        number_of_frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        header=ds,
        acquisition_number=_int_or_none(ds.get("AcquisitionNumber")),
        convolution_kernel=_kernel(ds),
    )


MAX_FRAGMENTS_WALKED = 20_000


def count_fragments(fh: BinaryIO, little: bool) -> int | None:
    """Items of encapsulated pixel data from ``fh``'s position (just after the element header).

    Reads only the 8-byte item headers, seeking over their values. Returns the number of items
    (the basic offset table included), or ``-1`` when the file ends before the sequence
    delimiter (truncated), or ``None`` when there are more than :data:`MAX_FRAGMENTS_WALKED`.
    """
    order: Literal["little", "big"] = "little" if little else "big"
    size = os.fstat(fh.fileno()).st_size
    for count in range(MAX_FRAGMENTS_WALKED):
        head = fh.read(8)
        if len(head) < 8:
            return -1
        group = int.from_bytes(head[0:2], order)
        element = int.from_bytes(head[2:4], order)
        length = int.from_bytes(head[4:8], order)
        if (group, element) == (0xFFFE, 0xE0DD):
            return count
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return -1
        if fh.seek(length, os.SEEK_CUR) > size:
            return -1
    return None


PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float and Double Float Pixel Data
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ")


def locate_pixel_data(fh: BinaryIO, ds: Dataset) -> tuple[int | None, int | None, int | None]:
    """Offset, declared length and (encapsulated) item count of the pixel data element.

    ``fh`` is where a read with ``stop_before_pixels`` left it: at the tag of the pixel data
    element when there is one. Only element and item headers are read (never the pixel data),
    so a header scan can bound what the file declares. Returns ``(None, None, None)`` when no
    pixel data element follows; the length is ``None`` when undefined (encapsulated), and only
    then is the item count given (see :func:`count_fragments`).
    """
    offset = fh.tell()
    head = fh.read(12)
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "")
    if len(head) < 8 or syntax == "1.2.840.10008.1.2.1.99":  # deflated: offsets say nothing
        return None, None, None
    # The encoding pydicom found the dataset in (also right when the file meta lacks a syntax).
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        implicit = syntax == "1.2.840.10008.1.2"
        little = syntax != "1.2.840.10008.1.2.2"
    order: Literal["little", "big"] = "little" if little else "big"
    group = int.from_bytes(head[0:2], order)
    element = int.from_bytes(head[2:4], order)
    if (group << 16) | element not in PIXEL_DATA_TAGS:
        return None, None, None
    if implicit:  # implicit VR: tag, then a 4-byte length
        length, header_size = int.from_bytes(head[4:8], order), 8
    elif head[4:6] in _LONG_VRS and len(head) == 12:
        length, header_size = int.from_bytes(head[8:12], order), 12
    else:  # a malformed short-VR pixel data element
        length, header_size = int.from_bytes(head[6:8], order), 8
    if length != 0xFFFFFFFF:
        return offset, length, None
    fh.seek(offset + header_size)
    return offset, None, count_fragments(fh, little)


def read_header(path: Path) -> Instance | BadFile:
    """Read one file's header (no pixel data); a :class:`BadFile` if it cannot be used."""
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=_HEADER_TAG_LIST)
            pixel_offset, pixel_length, pixel_items = locate_pixel_data(fh, ds)
            stat = os.fstat(fh.fileno())
    except InvalidDicomError:
        return BadFile(path, "not a DICOM file (no DICM preamble and no readable dataset)")
    except (OSError, EOFError) as exc:
        return BadFile(path, f"unreadable: {exc}")
    except Exception as exc:  # pydicom raises many types on corrupt input
        return BadFile(path, f"corrupt DICOM header: {type(exc).__name__}: {exc}")
    try:
        inst = instance_from_header(path, ds)
        inst.pixel_data_offset = pixel_offset
        inst.pixel_data_length = pixel_length
        inst.pixel_data_items = pixel_items
        inst.file_size = stat.st_size
        inst.file_mtime_ns = stat.st_mtime_ns
        return inst
    except ValueError as exc:
        return BadFile(path, f"not usable as an image instance: {exc}")
    except Exception as exc:
        return BadFile(path, f"corrupt DICOM header: {type(exc).__name__}: {exc}")


def group_instances(instances: Iterable[Instance]) -> tuple[list[Series], int]:
    """Group instances by (Study, Series) UID; the same SOPInstanceUID twice counts once.

    Returns the series, in order of first appearance, and the number of duplicates dropped.
    """
    by_series: dict[tuple[str, str], Series] = {}
    seen: set[str] = set()
    n_duplicates = 0
    for inst in instances:
        if inst.sop_instance_uid in seen:
            n_duplicates += 1
            key = (inst.study_instance_uid, inst.series_instance_uid)
            if key in by_series:
                by_series[key].duplicates += 1
            logger.debug("duplicate SOPInstanceUID %s at %s", inst.sop_instance_uid, inst.path)
            continue
        seen.add(inst.sop_instance_uid)
        key = (inst.study_instance_uid, inst.series_instance_uid)
        series = by_series.get(key)
        if series is None:
            series = Series(
                study_instance_uid=inst.study_instance_uid,
                series_instance_uid=inst.series_instance_uid,
                modality=inst.modality,
                instances=[],
            )
            by_series[key] = series
        series.instances.append(inst)
    return list(by_series.values()), n_duplicates


def scan_files(
    paths: Sequence[Path], on_instance: Callable[[Instance], None] | None = None
) -> ScanReport:
    """Read the headers of ``paths`` and group them into series (unjudged).

    ``on_instance`` is called with each instance as soon as its header is read (e.g. to start
    decoding it while the scan goes on).
    """
    report = ScanReport(n_files=len(paths))
    instances: list[Instance] = []
    for path in paths:
        result = read_header(path)
        if isinstance(result, BadFile):
            logger.info("skipping %s: %s", path, result.reason)
            report.bad_files.append(result)
        else:
            instances.append(result)
            if on_instance is not None:
                on_instance(result)
    report.series, _ = group_instances(instances)
    return report
