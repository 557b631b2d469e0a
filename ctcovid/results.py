"""The scan-level result that classify, the DICOM node and batch all produce."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a result (goes into JSON and the SR)."""

    name: str
    version: str
    device_uid: str
    runtime: str = "keras"  # keras | onnx | int8: what computed the numbers

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ScanResult:
    """One series, classified.

    ``probability_covid`` is the mean of ``slice_probabilities`` stated at
    ``ctcovid.scans.PROBABILITY_QUANTUM`` (``probability_covid_raw`` is the mean as computed, for
    analysis only: nothing is derived from it); ``label`` applies ``threshold`` to the stated value,
    or is ``"indeterminate"`` when more than the ingest's ``max_lost_fraction`` of the slices
    were lost (the probability is still reported).
    ``sop_instance_uids`` lists the instances analysed, in the order of ``slice_probabilities``
    (for an enhanced multi-frame series the same UID repeats with ``frame_numbers``).
    """

    study_instance_uid: str
    series_instance_uid: str
    probability_covid: float
    label: str  # "covid" | "non-covid" | "indeterminate" (too many slices lost)
    threshold: float
    n_slices_total: int
    n_slices_used: int
    slice_probabilities: list[float]
    sop_instance_uids: list[str]
    frame_numbers: list[int]
    z_mm: list[float]
    key_slice_indices: list[int]
    model: ModelInfo
    window_center_hu: float
    window_width_hu: float
    slice_policy: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    # Slices of the chosen stack (``n_slices_total``, from the headers) that were not decoded or
    # were dropped for cause; above the ingest's ``max_lost_fraction`` the label is indeterminate.
    n_slices_lost: int = 0
    # The reconstruction classified: kernel, slice thickness, image type, number of slices.
    stack: dict[str, Any] | None = None
    # Every ingest setting of the model (IngestConfig.to_dict()): part of what shaped the result.
    ingest: dict[str, Any] = field(default_factory=dict)
    # The unrounded mean: not stated in the SR, not part of its identity.
    probability_covid_raw: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["runtime"] = self.model.runtime
        return d
