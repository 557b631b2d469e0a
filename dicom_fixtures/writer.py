"""Write synthetic volumes as DICOM Part 10 files.

Covers what a DICOM-native CT pipeline meets in practice: classic one-file-per-
slice CT series in several transfer syntaxes, signed and unsigned storage with
arbitrary rescale, an Enhanced CT multi-frame instance, localizers, non-CT
series in the same study, and damaged or non-DICOM files.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from .identity import StudyIdentity, make_uid

logger = logging.getLogger(__name__)

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "MANUFACTURER",
    "MR_IMAGE_STORAGE",
    "TRANSFER_SYNTAXES",
    "available_transfer_syntaxes",
    "hu_to_stored",
    "write_ct_series",
    "write_junk",
    "write_localizer",
    "write_mr_series",
]

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
MANUFACTURER = "ctcovid-fixtures"

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
_NATIVE = {"explicit", "implicit"}

_AXIAL_IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
_CORONAL_IOP = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
_LUNG_WINDOW = (-600.0, 1500.0)


@functools.lru_cache(maxsize=1)
def available_transfer_syntaxes() -> list[str]:
    """Names from :data:`TRANSFER_SYNTAXES` whose encoder works here.

    Native syntaxes always work; each compressed one is probed with a tiny
    signed 16-bit encode/decode round trip, since an installed plugin may still
    fail (e.g. a build without the encoder).
    """
    out = []
    probe = (np.arange(64 * 64, dtype=np.int16).reshape(64, 64) * 7) - 12000
    for name, uid in TRANSFER_SYNTAXES.items():
        if name in _NATIVE:
            out.append(name)
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        _set_pixel_module(ds, 64, 64, signed=True, bits_stored=16)
        try:
            ds.compress(uid, probe, generate_instance_uid=False)
            ok = np.array_equal(ds.pixel_array, probe)
        except Exception as exc:  # any plugin failure means "not available"
            logger.info("transfer syntax %s unavailable: %s", name, exc)
            continue
        if ok:
            out.append(name)
        else:
            logger.info("transfer syntax %s round trip was not lossless", name)
    return out


def hu_to_stored(
    hu: np.ndarray, *, signed: bool, slope: float, intercept: float
) -> tuple[np.ndarray, int]:
    """Convert HU to stored pixel values and choose Bits Stored.

    ``stored = round((hu - intercept) / slope)`` clipped to the dtype range.
    Unsigned data uses 12 bits stored when the values fit, as most scanners do.

    Returns
    -------
    stored : numpy.ndarray
        int16 (signed) or uint16 (unsigned) array.
    bits_stored : int
    """
    if slope == 0:
        raise ValueError("rescale slope must be non-zero")
    info = np.iinfo(np.int16 if signed else np.uint16)
    inv = 1.0 / slope
    if float(intercept).is_integer() and inv.is_integer() and np.issubdtype(hu.dtype, np.integer):
        # Exact integer arithmetic: no rounding is involved, and when the range
        # fits (the usual case) there is no clipping pass either.
        b, m = int(intercept), int(inv)
        lo, hi = (int(hu.min()) - b) * m, (int(hu.max()) - b) * m
        if info.min <= lo and hi <= info.max:
            if b == 0 and m == 1:
                stored = hu.astype(info.dtype, copy=False)
            else:
                stored = ((hu.astype(np.int32) - b) * m).astype(info.dtype)
            return stored, _bits_stored(stored, signed)
        raw = (hu.astype(np.int32) - b) * m
    else:
        raw = np.rint((hu.astype(np.float64) - intercept) / slope)
    n_clipped = int(np.count_nonzero((raw < info.min) | (raw > info.max)))
    if n_clipped:
        logger.warning("%d pixel values clipped to the %s range", n_clipped, info.dtype)
    stored = np.clip(raw, info.min, info.max).astype(info.dtype)
    return stored, _bits_stored(stored, signed)


def _bits_stored(stored: np.ndarray, signed: bool) -> int:
    # Unsigned CT is conventionally 12 bits stored; keep 16 when values need it.
    if not signed and stored.size and int(stored.max()) <= 4095:
        return 12
    return 16


def _set_pixel_module(ds: Dataset, rows: int, cols: int, *, signed: bool, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _file_meta(sop_class: str, sop_instance: str, ts: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ts
    meta.ImplementationVersionName = "CTCOVID_FIX_1"
    return meta


def _set_study(ds: Dataset, study: StudyIdentity) -> None:
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.StudyDescription = study.study_description


def _set_series(
    ds: Dataset,
    study: StudyIdentity,
    *,
    modality: str,
    series_uid: str,
    series_number: int,
    description: str,
    sop_class: str,
    sop_instance: str,
) -> None:
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    _set_study(ds, study)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS" if modality == "CT" else "HFS"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "Synthetic Phantom"
    ds.InstitutionName = "Fixture Hospital"
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = study.study_time


def _set_pixels(ds: Dataset, arr: np.ndarray, transfer_syntax: str) -> None:
    """Attach pixel data natively or through pydicom's encoders."""
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax in _NATIVE:
        ds.file_meta.TransferSyntaxUID = uid
        # DICOM native pixel data here is little endian whatever the host is.
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        ds["PixelData"].VR = "OW"
    else:
        ds.compress(uid, arr, generate_instance_uid=False)


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # enforce_file_format writes the preamble, DICM prefix and a complete
    # File Meta Information group, i.e. a conformant Part 10 file.
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _file_names(
    n: int, numbers: Sequence[int], shuffle: bool, seed_uid: str, rng: np.random.Generator | None
) -> list[str]:
    if not shuffle:
        return [f"IM{num:04d}.dcm" for num in numbers]
    if rng is None:
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_uid.encode()).digest()[:8]))
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        name = rng.bytes(8).hex().upper()
        if name not in names:  # a clash is astronomically unlikely, but cheap to rule out
            names.add(name)
            out.append(name)
    return out


def write_ct_series(
    phantom_hu: np.ndarray,
    out_dir: Path,
    *,
    study: StudyIdentity,
    series_instance_uid: str,
    series_number: int = 2,
    series_description: str = "Chest CT",
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.7),
    slice_thickness_mm: float = 1.25,
    spacing_between_mm: float | None = None,
    z0_mm: float = -200.0,
    transfer_syntax: str = "explicit",
    signed: bool = True,
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    shuffle_names: bool = False,
    reverse_instance_numbers: bool = False,
    enhanced: bool = False,
    rng: np.random.Generator | None = None,
    convolution_kernel: str = "STANDARD",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    acquisition_number: int = 1,
    sop_uid_seed: str | None = None,
) -> list[Path]:
    """Write an axial CT volume as a DICOM series.

    Parameters
    ----------
    phantom_hu : numpy.ndarray
        HU volume, shape (slices, rows, cols), slices ordered by increasing z.
    out_dir : pathlib.Path
        Directory for the files (created).
    study : StudyIdentity
        Patient/study attributes.
    series_instance_uid : str
        SOP Instance UIDs are derived from it, so it fixes the whole series.
    pixel_spacing_mm : tuple of float
        (row spacing, column spacing).
    spacing_between_mm : float, optional
        z step between slices; defaults to ``slice_thickness_mm``.
    z0_mm : float
        z of the first (lowest) slice.
    transfer_syntax : str
        A key of :data:`TRANSFER_SYNTAXES`.
    signed : bool
        PixelRepresentation 1 (int16) or 0 (uint16).
    rescale_slope, rescale_intercept : float
        ``stored = round((hu - intercept) / slope)``. The intercept defaults to
        0 for signed and -1024 for unsigned storage.
    shuffle_names : bool
        Random hex file names instead of ``IM{InstanceNumber:04d}.dcm``.
    reverse_instance_numbers : bool
        InstanceNumber decreases with z (frames stored head first if enhanced).
    enhanced : bool
        Write one Enhanced CT multi-frame instance instead.
    rng : numpy.random.Generator, optional
        Used only for shuffled names; derived from the series UID if omitted.
    convolution_kernel, image_type, acquisition_number : optional
        ConvolutionKernel, ImageType and AcquisitionNumber of every slice (classic CT only).
    sop_uid_seed : str, optional
        Seed of the SOP Instance UIDs instead of the series UID, so that several
        reconstructions (written into separate folders) can share one series.

    Returns
    -------
    list of pathlib.Path
        Written files ordered by increasing z (a single path if enhanced).
    """
    if phantom_hu.ndim != 3:
        raise ValueError(f"expected (slices, rows, cols), got shape {phantom_hu.shape}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"unknown transfer syntax {transfer_syntax!r}; choose from {sorted(TRANSFER_SYNTAXES)}"
        )
    if rescale_intercept is None:
        rescale_intercept = 0.0 if signed else -1024.0
    spacing = slice_thickness_mm if spacing_between_mm is None else spacing_between_mm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored, bits_stored = hu_to_stored(
        phantom_hu, signed=signed, slope=rescale_slope, intercept=rescale_intercept
    )
    n, rows, cols = stored.shape
    # Centre the volume on the z axis of the scanner (x = y = 0 at the middle).
    x0 = -(cols - 1) / 2.0 * pixel_spacing_mm[1]
    y0 = -(rows - 1) / 2.0 * pixel_spacing_mm[0]
    zs = [z0_mm + k * spacing for k in range(n)]
    geometry = _Geometry(pixel_spacing_mm, slice_thickness_mm, spacing, x0, y0, zs)
    rescale = (rescale_slope, rescale_intercept)

    if enhanced:
        return [
            _write_enhanced(
                stored,
                out_dir,
                study=study,
                series_uid=series_instance_uid,
                series_number=series_number,
                description=series_description,
                geometry=geometry,
                bits_stored=bits_stored,
                signed=signed,
                rescale=rescale,
                transfer_syntax=transfer_syntax,
                head_first=reverse_instance_numbers,
                shuffle_names=shuffle_names,
                rng=rng,
            )
        ]

    numbers = [n - k if reverse_instance_numbers else k + 1 for k in range(n)]
    names = _file_names(n, numbers, shuffle_names, series_instance_uid, rng)
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]

    # Everything constant across the series is built once; each slice gets a
    # fresh Dataset over a copy of the element dict (elements are shared but
    # never mutated) plus its own per-slice elements. This roughly halves the
    # Python overhead per file compared with setting ~70 attributes each time.
    template = Dataset()
    _set_series(
        template,
        study,
        modality="CT",
        series_uid=series_instance_uid,
        series_number=series_number,
        description=series_description,
        sop_class=CT_IMAGE_STORAGE,
        sop_instance="1.2",
    )
    del template.SOPInstanceUID
    template.ImageType = list(image_type)
    template.AcquisitionNumber = acquisition_number
    template.ImageOrientationPatient = _AXIAL_IOP
    template.PixelSpacing = [float(v) for v in pixel_spacing_mm]
    template.SliceThickness = slice_thickness_mm
    template.SpacingBetweenSlices = spacing
    _set_ct_acquisition(template)
    template.ConvolutionKernel = convolution_kernel
    _set_pixel_module(template, rows, cols, signed=signed, bits_stored=bits_stored)
    template.RescaleIntercept = rescale_intercept
    template.RescaleSlope = rescale_slope
    template.RescaleType = "HU"
    template.WindowCenter, template.WindowWidth = _LUNG_WINDOW
    template.WindowCenterWidthExplanation = "LUNG"
    shared = {elem.tag: elem for elem in template.elements()}

    paths = []
    for k in range(n):
        sop_uid = make_uid(sop_uid_seed or series_instance_uid, "sop", k)
        ds = Dataset(dict(shared))
        ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid, ts_uid)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = numbers[k]
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(zs[k], 4)]
        ds.SliceLocation = round(zs[k], 4)
        _set_pixels(ds, stored[k], transfer_syntax)
        paths.append(_save(ds, out_dir / names[k]))
    logger.debug("wrote %d %s CT slices to %s", n, transfer_syntax, out_dir)
    return paths


def _set_ct_acquisition(ds: Dataset) -> None:
    """Acquisition attributes from the CT Image module (Type 2/3)."""
    ds.KVP = 120
    ds.XRayTubeCurrent = 200
    ds.ExposureTime = 500
    ds.ConvolutionKernel = "STANDARD"
    ds.DataCollectionDiameter = 500.0
    ds.ReconstructionDiameter = 360.0
    ds.GantryDetectorTilt = 0.0
    ds.TableHeight = 150.0
    ds.RotationDirection = "CW"
    ds.PatientOrientation = ""


class _Geometry:
    """Plane geometry shared by the classic and enhanced writers."""

    def __init__(
        self,
        pixel_spacing: tuple[float, float],
        thickness: float,
        spacing: float,
        x0: float,
        y0: float,
        zs: list[float],
    ) -> None:
        self.pixel_spacing = [float(v) for v in pixel_spacing]
        self.thickness = thickness
        self.spacing = spacing
        self.x0 = x0
        self.y0 = y0
        self.zs = zs


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _write_enhanced(
    stored: np.ndarray,
    out_dir: Path,
    *,
    study: StudyIdentity,
    series_uid: str,
    series_number: int,
    description: str,
    geometry: _Geometry,
    bits_stored: int,
    signed: bool,
    rescale: tuple[float, float],
    transfer_syntax: str,
    head_first: bool,
    shuffle_names: bool,
    rng: np.random.Generator | None,
) -> Path:
    """One Enhanced CT Image Storage instance holding every slice as a frame.

    Simplified with respect to the Enhanced CT IOD: of the mandatory CT
    functional groups only Pixel Measures, Plane Orientation, Plane Position,
    Frame Content, Frame Anatomy, Irradiation Event Identification, CT Image
    Frame Type, CT Acquisition Type, CT X-Ray Details, Pixel Value
    Transformation and Frame VOI LUT are written; CT Acquisition Details,
    Table Dynamics, Position, Geometry, Reconstruction and Exposure are
    omitted, and the Acquisition Context sequence is empty. Rescale is in
    the shared functional group only (not at the top level), as in real
    enhanced objects, so readers must look there.
    """
    n, rows, cols = stored.shape
    order = list(range(n - 1, -1, -1)) if head_first else list(range(n))
    sop_uid = make_uid(series_uid, "enhanced")
    ds = Dataset()
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    ds.file_meta = _file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_uid, ts_uid)
    _set_series(
        ds,
        study,
        modality="CT",
        series_uid=series_uid,
        series_number=series_number,
        description=description,
        sop_class=ENHANCED_CT_IMAGE_STORAGE,
        sop_instance=sop_uid,
    )
    # Enhanced objects carry AcquisitionDateTime instead.
    del ds.AcquisitionDate, ds.AcquisitionTime
    ds.DeviceSerialNumber = "0000"
    ds.SoftwareVersions = "1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = study.study_date + study.study_time
    ds.AcquisitionDuration = 5.0
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    ds.AcquisitionContextSequence = DicomSequence()
    _set_pixel_module(ds, rows, cols, signed=signed, bits_stored=bits_stored)

    dim_uid = make_uid(series_uid, "dimension-organization")
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dim_uid)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00209056,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="Stack ID",
        ),
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00209057,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="In-Stack Position Number",
        ),
    ]

    slope, intercept = rescale
    shared = _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=geometry.pixel_spacing,
                SliceThickness=geometry.thickness,
                SpacingBetweenSlices=geometry.spacing,
            )
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=_AXIAL_IOP)],
        PixelValueTransformationSequence=[
            _item(RescaleIntercept=intercept, RescaleSlope=slope, RescaleType="HU")
        ],
        CTImageFrameTypeSequence=[
            _item(
                FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
        CTAcquisitionTypeSequence=[
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        ],
        CTXRayDetailsSequence=[
            _item(KVP=120, FilterType="BODY", FilterMaterial="ALUMINUM", FocalSpots=[1.2])
        ],
        FrameAnatomySequence=[
            _item(
                FrameLaterality="B",
                AnatomicRegionSequence=[
                    _item(CodeValue="51185008", CodingSchemeDesignator="SCT", CodeMeaning="Thorax")
                ],
            )
        ],
        IrradiationEventIdentificationSequence=[
            _item(IrradiationEventUID=make_uid(series_uid, "irradiation-event"))
        ],
        FrameVOILUTSequence=[
            _item(
                WindowCenter=_LUNG_WINDOW[0],
                WindowWidth=_LUNG_WINDOW[1],
                WindowCenterWidthExplanation="LUNG",
            )
        ],
    )
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    for k in order:
        z = round(geometry.zs[k], 4)
        # InStackPositionNumber counts along increasing z whatever the frame order.
        in_stack = k + 1
        per_frame.append(
            _item(
                PlanePositionSequence=[
                    _item(ImagePositionPatient=[round(geometry.x0, 4), round(geometry.y0, 4), z])
                ],
                FrameContentSequence=[
                    _item(
                        FrameAcquisitionNumber=1,
                        FrameReferenceDateTime=ds.AcquisitionDateTime,
                        FrameAcquisitionDateTime=ds.AcquisitionDateTime,
                        FrameAcquisitionDuration=10.0,
                        StackID="1",
                        InStackPositionNumber=in_stack,
                        DimensionIndexValues=[1, in_stack],
                    )
                ],
            )
        )
    ds.PerFrameFunctionalGroupsSequence = per_frame
    _set_pixels(ds, np.ascontiguousarray(stored[order]), transfer_syntax)
    name = _file_names(1, [1], shuffle_names, series_uid, rng)[0]
    path = _save(ds, out_dir / name)
    logger.debug("wrote enhanced CT with %d frames to %s", n, path)
    return path


def write_localizer(
    out_dir: Path,
    study: StudyIdentity,
    *,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    hu: np.ndarray | None = None,
    pixel_spacing_mm: float = 0.7,
    slice_spacing_mm: float = 1.25,
    z0_mm: float = -200.0,
    transfer_syntax: str = "explicit",
) -> Path:
    """Write a coronal CT localizer (scout) in its own series.

    Parameters
    ----------
    hu : numpy.ndarray, optional
        Axial volume (slices by increasing z, rows, cols); the localizer is its
        mean along the anterior-posterior axis. A plain synthetic body outline
        is used when omitted.

    Returns
    -------
    pathlib.Path
    """
    if hu is None:
        yy, xx = np.mgrid[0:64, 0:64]
        proj = np.where(((xx - 31.5) / 24) ** 2 + ((yy - 31.5) / 40) ** 2 <= 1, -300.0, -1000.0)
        z_top = z0_mm + 63 * slice_spacing_mm
    else:
        # Row 0 of a coronal image with column direction (0, 0, -1) is the
        # top (head end), hence the flip.
        proj = hu.astype(np.float32).mean(axis=1)[::-1]
        z_top = z0_mm + (hu.shape[0] - 1) * slice_spacing_mm
    rows, cols = proj.shape
    series_uid = series_instance_uid or make_uid(study.study_instance_uid, "localizer-series")
    sop_uid = make_uid(series_uid, "sop", 0)
    stored, bits = hu_to_stored(proj, signed=True, slope=1.0, intercept=0.0)
    ds = Dataset()
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid, TRANSFER_SYNTAXES[transfer_syntax])
    _set_series(
        ds,
        study,
        modality="CT",
        series_uid=series_uid,
        series_number=series_number,
        description="Topogram",
        sop_class=CT_IMAGE_STORAGE,
        sop_instance=sop_uid,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    x0 = -(cols - 1) / 2.0 * pixel_spacing_mm
    ds.ImagePositionPatient = [round(x0, 4), 0.0, round(z_top, 4)]
    ds.ImageOrientationPatient = _CORONAL_IOP
    ds.PixelSpacing = [slice_spacing_mm, pixel_spacing_mm]
    ds.SliceThickness = ""
    _set_ct_acquisition(ds)
    _set_pixel_module(ds, rows, cols, signed=True, bits_stored=bits)
    ds.RescaleIntercept = 0.0
    ds.RescaleSlope = 1.0
    # No RescaleType: HU is not appropriate for a projection image.
    ds.WindowCenter, ds.WindowWidth = -400.0, 1600.0
    _set_pixels(ds, stored, transfer_syntax)
    return _save(ds, Path(out_dir) / "IM0001.dcm")


def write_mr_series(
    out_dir: Path,
    study: StudyIdentity,
    n: int = 3,
    *,
    series_instance_uid: str | None = None,
    series_number: int = 3,
    size: int = 32,
) -> list[Path]:
    """Write a tiny axial MR series (MR Image Storage) into the study.

    Returns
    -------
    list of pathlib.Path
        One file per image.
    """
    series_uid = series_instance_uid or make_uid(study.study_instance_uid, "mr-series")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(series_uid.encode()).digest()[:8]))
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((xx - (size - 1) / 2) / (0.4 * size)) ** 2 + ((yy - (size - 1) / 2) / (0.3 * size)) ** 2
    paths = []
    for k in range(n):
        img = np.where(body <= 1, 800.0, 5.0) + rng.normal(0, 20, (size, size))
        arr = np.clip(np.rint(img), 0, 4095).astype(np.uint16)
        sop_uid = make_uid(series_uid, "sop", k)
        ds = Dataset()
        ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_uid, ExplicitVRLittleEndian)
        _set_series(
            ds,
            study,
            modality="MR",
            series_uid=series_uid,
            series_number=series_number,
            description="T2 AX",
            sop_class=MR_IMAGE_STORAGE,
            sop_instance=sop_uid,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-(size - 1) / 2.0, -(size - 1) / 2.0, 5.0 * k]
        ds.ImageOrientationPatient = _AXIAL_IOP
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 5.0
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 4000.0
        ds.EchoTime = 90.0
        ds.EchoTrainLength = 16
        ds.MagneticFieldStrength = 1.5
        _set_pixel_module(ds, size, size, signed=False, bits_stored=12)
        _set_pixels(ds, arr, "explicit")
        paths.append(_save(ds, Path(out_dir) / f"IM{k + 1:04d}.dcm"))
    return paths


def write_junk(out_dir: Path, ct_file: Path) -> dict[str, Path]:
    """Write files a scan folder should tolerate.

    Parameters
    ----------
    out_dir : pathlib.Path
        Directory for the files (created).
    ct_file : pathlib.Path
        An existing single-frame CT file to derive from.

    Returns
    -------
    dict
        ``text``: a non-DICOM text file; ``truncated``: a CT file (new SOP
        Instance UID) cut in the middle of its pixel data; ``no_pixel_data``:
        a valid CT file (new SOP Instance UID) without PixelData;
        ``duplicate``: a byte-identical copy of ``ct_file``; ``empty``: a
        zero-length file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    text = out_dir / "notes.txt"
    text.write_text("Synthetic scan folder. This file is not DICOM.\n", encoding="ascii")
    out["text"] = text

    src = pydicom.dcmread(ct_file)
    if "PixelData" not in src:
        raise ValueError(f"{ct_file} has no pixel data")

    trunc = pydicom.dcmread(ct_file)
    trunc.SOPInstanceUID = make_uid(src.SOPInstanceUID, "truncated")
    trunc.file_meta.MediaStorageSOPInstanceUID = trunc.SOPInstanceUID
    full = out_dir / "IM_TRUNC.dcm"
    _save(trunc, full)
    data = full.read_bytes()
    pixel_len = len(trunc.PixelData)
    # Pixel Data is the last element, so this cuts it roughly in half.
    full.write_bytes(data[: len(data) - pixel_len // 2])
    out["truncated"] = full

    nopix = pydicom.dcmread(ct_file)
    del nopix.PixelData
    nopix.SOPInstanceUID = make_uid(src.SOPInstanceUID, "no-pixel-data")
    nopix.file_meta.MediaStorageSOPInstanceUID = nopix.SOPInstanceUID
    out["no_pixel_data"] = _save(nopix, out_dir / "IM_NOPIX.dcm")

    dup = out_dir / "IM_DUP.dcm"
    shutil.copyfile(ct_file, dup)
    out["duplicate"] = dup

    empty = out_dir / "IM_EMPTY.dcm"
    empty.write_bytes(b"")
    out["empty"] = empty
    return out
