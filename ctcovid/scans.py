"""What the model sees of a scan, and what its slice probabilities mean: written once.

Inference (:class:`ctcovid.inference.Classifier`), the training cache, evaluation and batch all
call these functions, so that a model is trained, validated and used on the same slices:

- :func:`model_slices` applies the slice policy and the slice minimum to any stack of
  model-ready slices (a DICOM series after preprocessing, or a COV19-CT-DB scan's JPGs);
- :func:`prepare_scan` does that for a DICOM series and keeps what identifies each slice;
- :func:`scan_probability` and :func:`scan_result` turn slice probabilities into the scan's
  probability, label and result; :func:`lost_slices` counts what the result did not see.

Everything a result states derives from probabilities rounded to :data:`PROBABILITY_QUANTUM`
(:func:`stated_probability`): the label, the SR's value, the key-slice ranking. Digits below
it are noise of the arithmetic (thread count, CPU, runtime), not information; a result that
differs only there is the same result, with the same SR identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctcovid.config import IngestConfig
from ctcovid.dicom.types import Series
from ctcovid.errors import InvalidInputError
from ctcovid.preprocess import PreprocessedSeries, preprocess_series, select_slices
from ctcovid.results import ModelInfo, ScanResult

KEY_SLICES = 5  # slices named as key images in the result and the SR
INDETERMINATE = "indeterminate"

#: The precision at which probabilities are stated (JSON, SR, label, key slices): 0.001.
PROBABILITY_DECIMALS = 3
PROBABILITY_QUANTUM = 10.0**-PROBABILITY_DECIMALS


def stated_probability(p: float) -> float:
    """``p`` rounded to :data:`PROBABILITY_QUANTUM`, the value everything else derives from.

    Python's ``round`` rounds the exact binary value half to even, so the same float always
    states the same value.
    """
    return round(float(p), PROBABILITY_DECIMALS)


def stated_text(p: float) -> str:
    """``p`` as the report states it: :data:`PROBABILITY_DECIMALS` digits after the point."""
    return f"{stated_probability(p):.{PROBABILITY_DECIMALS}f}"


def same_finding(
    label: str, probability: float | None, other_label: str, other_probability: float | None
) -> bool:
    """Whether two results say the same thing clinically: the same label and the same
    probability as stated. A new result that says what was delivered is not sent again."""
    if probability is None or other_probability is None or not label:
        return False
    return label == other_label and stated_text(probability) == stated_text(other_probability)


def key_slice_order(slice_probabilities: np.ndarray | list[float]) -> list[int]:
    """Slice indices ranked by stated (rounded) probability, highest first, ties by index.

    Ranking rounded values keeps arithmetic noise from reordering slices that are equal at the
    stated precision, and so from changing which slices the SR names.
    """
    stated = [stated_probability(p) for p in slice_probabilities]
    return sorted(range(len(stated)), key=lambda i: (-stated[i], i))


@dataclass
class PreparedScan:
    """A preprocessed series after the slice policy: exactly what the model will see."""

    series: Series
    all_slices: PreprocessedSeries
    used: PreprocessedSeries
    warnings: list[str]
    #: The class-activation map of each used slice (N, h, w), unnormalised, when the model's
    #: scoring run computed it (an exported graph): heatmaps then need no second model run.
    cams: np.ndarray | None = None


def slice_minimum(ingest: IngestConfig) -> int:
    """Slices a DICOM series must keep after the slice policy to be classified.

    A model trained with ``max_slices`` N samples N slices by design; the minimum guards against
    series that lost slices (undecodable files), not against that sampling.
    """
    if ingest.max_slices is not None:
        return min(ingest.min_slices, ingest.max_slices)
    return ingest.min_slices


def model_slices(
    slices: np.ndarray, ingest: IngestConfig, *, name: str, minimum: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Indices of the slices the model sees, in order, and the slice policy's warnings.

    Parameters
    ----------
    slices
        Model-ready uint8 slices ``(N, S, S)`` in z order.
    ingest
        The model's ingest settings (slice policy, ``max_slices``).
    name
        What the slices are (``"Series 1.2.3"``, ``"scan ct_scan_7"``), for the error message.
    minimum
        Slices that must remain; ``None`` for no minimum.

    Raises
    ------
    InvalidInputError
        If fewer than ``minimum`` slices remain.
    """
    indices, warnings = select_slices(slices, ingest)
    if minimum is not None and len(indices) < minimum:
        raise InvalidInputError(
            f"{name}: {len(indices)} decodable slice(s) left after the slice policy, "
            f"at least {minimum} needed"
        )
    return indices, warnings


def prepare_scan(
    series: Series, ingest: IngestConfig, preprocessed: PreprocessedSeries | None = None
) -> PreparedScan:
    """Preprocess a usable series (unless ``preprocessed`` is given) and apply the slice policy
    and the slice minimum (:func:`slice_minimum`).

    Raises
    ------
    InvalidInputError
        If the series is not usable, no slice decodes, or too few slices remain.
    """
    if not series.usable:
        raise InvalidInputError(
            f"Series {series.series_instance_uid} is not usable: {series.reason}"
        )
    pp = preprocessed if preprocessed is not None else preprocess_series(series, ingest)
    indices, warnings = model_slices(
        pp.slices,
        ingest,
        name=f"Series {series.series_instance_uid}",
        minimum=slice_minimum(ingest),
    )
    return PreparedScan(series, pp, pp.subset(indices), list(pp.warnings) + warnings)


def lost_slices(prepared: PreparedScan) -> tuple[int, int]:
    """``(n_slices_total, n_slices_lost)`` of a prepared series.

    The total counts the chosen stack's slices from the headers (dropped ones included); lost
    are those dropped for cause before decoding plus those that did not decode.
    """
    total = max(prepared.series.n_slices_total, len(prepared.all_slices))
    return total, total - len(prepared.all_slices)


def scan_label(
    p_scan: float,
    *,
    threshold: float,
    classes: tuple[str, str],
    n_slices_total: int,
    n_slices_lost: int,
    max_lost_fraction: float,
) -> str:
    """The positive class when the stated (rounded) ``p_scan`` is at or above ``threshold``,
    else the negative one; ``indeterminate`` when more than ``max_lost_fraction`` of the slices
    were lost.

    The label follows the stated value, so a reader who compares the SR's probability with its
    threshold always finds the label the SR gives.
    """
    if n_slices_total and n_slices_lost / n_slices_total > max_lost_fraction:
        return INDETERMINATE
    positive, negative = classes
    return positive if stated_probability(p_scan) >= threshold else negative


def scan_probability(slice_probabilities: np.ndarray) -> float:
    """The scan's P(COVID): the mean of its slice probabilities (never a vote of rounded ones)."""
    probs = np.asarray(slice_probabilities, np.float64)
    if probs.size == 0:
        raise ValueError("a scan needs at least one slice probability.")
    return float(probs.mean())


def scan_result(
    prepared: PreparedScan,
    slice_probabilities: np.ndarray,
    *,
    ingest: IngestConfig,
    threshold: float,
    classes: tuple[str, str],
    model: ModelInfo,
    seconds: float,
) -> ScanResult:
    """The scan-level result of a prepared series from its slice probabilities.

    ``classes`` is ``(positive, negative)``; the label is the positive class when the stated
    scan probability reaches ``threshold``. ``probability_covid`` is the stated (rounded) mean,
    ``probability_covid_raw`` the mean as computed.
    """
    probs = np.asarray(slice_probabilities, np.float64)
    used = prepared.used
    if len(probs) != len(used):
        raise ValueError(
            f"{len(probs)} slice probabilities for {len(used)} slices of series "
            f"{prepared.series.series_instance_uid}."
        )
    p_raw = scan_probability(probs)
    p_scan = stated_probability(p_raw)
    order = key_slice_order(probs)[:KEY_SLICES]
    n_total, n_lost = lost_slices(prepared)
    label = scan_label(
        p_scan,
        threshold=threshold,
        classes=classes,
        n_slices_total=n_total,
        n_slices_lost=n_lost,
        max_lost_fraction=ingest.max_lost_fraction,
    )
    warnings = list(prepared.warnings)
    if n_lost:
        verdict = (
            f"above {ingest.max_lost_fraction:.0%}: label {INDETERMINATE}"
            if label == INDETERMINATE
            else f"within the {ingest.max_lost_fraction:.0%} allowed"
        )
        warnings.append(
            f"Series {prepared.series.series_instance_uid}: {n_lost} of {n_total} slice(s) lost "
            f"(undecodable or dropped for cause, named above), {verdict}"
        )
    stack = prepared.series.stack
    return ScanResult(
        study_instance_uid=prepared.series.study_instance_uid,
        series_instance_uid=prepared.series.series_instance_uid,
        probability_covid=p_scan,
        probability_covid_raw=p_raw,
        label=label,
        threshold=threshold,
        n_slices_total=n_total,
        n_slices_used=len(used),
        slice_probabilities=[float(p) for p in probs],
        sop_instance_uids=list(used.sop_instance_uids),
        frame_numbers=list(used.frame_numbers),
        z_mm=[None if np.isnan(z) else float(z) for z in used.z_mm],  # type: ignore[misc]
        key_slice_indices=order,
        model=model,
        window_center_hu=ingest.window_center_hu,
        window_width_hu=ingest.window_width_hu,
        slice_policy=ingest.slice_policy,
        seconds=round(seconds, 3),
        warnings=warnings,
        n_slices_lost=n_lost,
        stack=stack.to_dict() if stack is not None else None,
        ingest=ingest.to_dict(),
    )
