"""Plain records for what the header scan finds: instances, series and ordered slices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)


@dataclass
class Instance:
    """One DICOM file's header, as read without its pixel data."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    instance_number: int | None
    image_type: tuple[str, ...]
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, float, float, float, float, float] | None
    slice_thickness: float | None
    number_of_frames: int
    header: Dataset
    # Where the header scan found the pixel data element (None: not looked for, or absent):
    # its tag's byte offset, its declared value length (None when undefined, i.e. encapsulated),
    # for encapsulated data its item count (-1: truncated) and the file size, so that what the
    # header declares can be bounded before decoding.
    pixel_data_offset: int | None = None
    pixel_data_length: int | None = None
    pixel_data_items: int | None = None
    file_size: int | None = None
    # The file's modification time when its header was read: the pixel pass reads native pixel
    # data straight from the recorded offset only while the file is still the one scanned.
    file_mtime_ns: int | None = None
    acquisition_number: int | None = None
    convolution_kernel: str = ""

    @property
    def is_enhanced(self) -> bool:
        return self.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE


@dataclass(frozen=True)
class SliceRef:
    """One 2D slice of a series: an instance and, for multi-frame instances, a frame (0-based)."""

    instance: Instance
    frame_index: int
    z_mm: float | None

    @property
    def sop_instance_uid(self) -> str:
        return self.instance.sop_instance_uid

    @property
    def frame_number(self) -> int:
        """1-based frame number as DICOM counts (ReferencedFrameNumber)."""
        return self.frame_index + 1


@dataclass(frozen=True)
class BadFile:
    """A file that the scan could not use, with the reason."""

    path: Path
    reason: str


@dataclass
class Stack:
    """One reconstruction inside a series: the slices that belong in one volume.

    A series may hold several (two kernels, thin and thick slices, repeated acquisitions, a
    reformat); they are never mixed. ``instances`` are those to decode; ``dropped`` names
    ("path: reason") the instances of this stack refused for cause before decoding, which count
    as lost slices (``n_slices_dropped``).
    """

    image_type: tuple[str, ...]
    kernel: str
    slice_thickness: float | None
    orientation: tuple[float, ...] | None
    acquisition_number: int | None
    instances: list[Instance]
    slices: list[SliceRef] = field(default_factory=list)
    ordering: str = "position"  # "position" | "instance_number"
    reason: str = ""
    dropped: list[str] = field(default_factory=list)
    n_slices_dropped: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.reason

    @property
    def n_slices(self) -> int:
        """Slices to decode (instances dropped for cause excluded)."""
        return len(self.slices)

    @property
    def n_slices_total(self) -> int:
        """Slices of the stack according to the headers, dropped ones included."""
        return len(self.slices) + self.n_slices_dropped

    def describe(self) -> str:
        """One line naming the stack: kernel, thickness, ImageType, acquisition, slices."""
        thickness = (
            "thickness ?" if self.slice_thickness is None else f"{self.slice_thickness:g} mm"
        )
        acquisition = (
            "" if self.acquisition_number is None else f", acquisition {self.acquisition_number}"
        )
        image_type = "\\".join(self.image_type) or "?"
        return (
            f"kernel {self.kernel or '?'}, {thickness}, {image_type}{acquisition}, "
            f"{self.n_slices_total} slices"
        )

    def to_dict(self) -> dict[str, Any]:
        """The stack as the result JSON and ``ctcovid series --json`` report it."""
        return {
            "kernel": self.kernel,
            "slice_thickness_mm": self.slice_thickness,
            "image_type": list(self.image_type),
            "acquisition_number": self.acquisition_number,
            "n_slices": self.n_slices_total,
        }


@dataclass
class Series:
    """All instances of one SeriesInstanceUID, with its usability verdict and slice order."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    instances: list[Instance]
    usable: bool = False
    reason: str = ""
    slices: list[SliceRef] = field(default_factory=list)
    ordering: str = "position"  # "position" | "instance_number"
    duplicates: int = 0
    warnings: list[str] = field(default_factory=list)
    # Every reconstruction found, and the one chosen (its slices are ``slices``).
    stacks: list[Stack] = field(default_factory=list)
    stack: Stack | None = None

    @property
    def n_slices_total(self) -> int:
        """Slices of the chosen stack according to the headers, dropped ones included."""
        return self.stack.n_slices_total if self.stack is not None else len(self.slices)

    @property
    def n_slices_dropped(self) -> int:
        """Slices of the chosen stack refused for cause before decoding."""
        return self.stack.n_slices_dropped if self.stack is not None else 0

    @property
    def header(self) -> Dataset:
        """A representative header (patient, study and series modules) of the series."""
        return self.instances[0].header

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def series_description(self) -> str:
        return str(self.header.get("SeriesDescription", ""))

    @property
    def patient_id(self) -> str:
        return str(self.header.get("PatientID", ""))
