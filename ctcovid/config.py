"""Frozen settings objects shared by ingest, preprocessing, the model and inference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ctcovid.errors import ConfigError

SLICE_POLICIES = ("all", "lung")
# Criteria of IngestConfig.stack_rule, applied in the order given (see ctcovid.dicom.stacks).
STACK_CRITERIA = ("original", "thinnest", "thickest", "most")


@dataclass(frozen=True)
class IngestConfig:
    """How DICOM series are selected and turned into model input slices.

    Everything here travels inside the model artifact so that training and inference agree.
    """

    window_center_hu: float = -600.0
    window_width_hu: float = 1500.0
    image_size: int = 256
    min_slices: int = 8
    axial_tolerance_deg: float = 10.0
    slice_policy: str = "all"
    max_slices: int | None = None
    lung_min_fraction: float = 0.02
    # A series holding several reconstructions is split into stacks; one is classified, chosen by
    # these criteria in order: "original" (ORIGINAL before DERIVED), "thinnest" (thinnest slices
    # within [min_thickness_mm, max_thickness_mm] first), "thickest", "most" (most slices).
    stack_rule: str = "original,thinnest,most"
    min_thickness_mm: float = 1.0
    max_thickness_mm: float = 5.0
    # Above this fraction of the chosen stack's slices lost (undecodable or dropped for cause),
    # the label is "indeterminate" (the probability is still reported).
    max_lost_fraction: float = 0.10
    # What a file may declare before anything is decoded (decompression and header bombs).
    max_rows_columns: int = 4096
    max_frames: int = 5000

    def __post_init__(self) -> None:
        if self.window_width_hu <= 0:
            raise ConfigError(
                f"window_width_hu must be positive. Received: {self.window_width_hu}."
            )
        if self.image_size < 16:
            raise ConfigError(f"image_size must be at least 16. Received: {self.image_size}.")
        if self.min_slices < 1:
            raise ConfigError(f"min_slices must be at least 1. Received: {self.min_slices}.")
        if self.slice_policy not in SLICE_POLICIES:
            raise ConfigError(
                f"slice_policy must be one of {', '.join(SLICE_POLICIES)}. "
                f"Received: {self.slice_policy!r}."
            )
        if self.max_slices is not None and self.max_slices < 1:
            raise ConfigError(f"max_slices must be at least 1. Received: {self.max_slices}.")
        criteria = self.stack_criteria
        unknown = [c for c in criteria if c not in STACK_CRITERIA]
        if not criteria or unknown:
            raise ConfigError(
                f"stack_rule must be a comma-separated list of {', '.join(STACK_CRITERIA)}. "
                f"Received: {self.stack_rule!r}."
            )
        if not 0.0 <= self.min_thickness_mm <= self.max_thickness_mm:
            raise ConfigError(
                "min_thickness_mm must be in [0, max_thickness_mm]. "
                f"Received: {self.min_thickness_mm}, {self.max_thickness_mm}."
            )
        if not 0.0 <= self.max_lost_fraction <= 1.0:
            raise ConfigError(
                f"max_lost_fraction must be in [0, 1]. Received: {self.max_lost_fraction}."
            )
        if self.max_rows_columns < 1 or self.max_frames < 1:
            raise ConfigError(
                "max_rows_columns and max_frames must be at least 1. "
                f"Received: {self.max_rows_columns}, {self.max_frames}."
            )

    @property
    def stack_criteria(self) -> tuple[str, ...]:
        """The criteria of :attr:`stack_rule`, in order."""
        return tuple(c.strip().lower() for c in self.stack_rule.split(",") if c.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IngestConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Res-Dense Net."""

    input_size: int = 256
    backbones: tuple[str, str] = ("resnet101", "densenet121")
    dropout: float = 0.5
    weights: str | None = None  # "imagenet", None, or a folder of Keras no-top weight files
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise ConfigError(f"input_size must be at least 32. Received: {self.input_size}.")
        if len(self.backbones) != 2:
            raise ConfigError(f"backbones must name two networks. Received: {self.backbones}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1). Received: {self.dropout}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backbones"] = list(self.backbones)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in data.items() if k in known}
        if "backbones" in kw:
            kw["backbones"] = tuple(kw["backbones"])
        return cls(**kw)
