"""Frozen settings objects shared by ingest, preprocessing, the model and inference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ctcovid.errors import ConfigError

SLICE_POLICIES = ("all", "lung")


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
