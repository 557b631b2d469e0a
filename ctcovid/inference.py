"""Scan-level classification: slices in batches through the Res-Dense Net, mean probability.

``Classifier.from_file(path).classify(series)`` is the one code path that ``ctcovid classify``,
the DICOM node and batch reprocessing share.

A series is scored in its own batches of :data:`SCORING_BATCH_SIZE` slices, counted from its
first slice, the last one padded with blank slices whose outputs are dropped. Every model call
for a series is then the same whatever the user's ``--batch-size``, the front (classify, node,
batch) or the series scored before and after it, so its numbers are the same bytes on one
machine and runtime (the runtime's threads are pinned too, ``ctcovid.model.runtimes``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.config import IngestConfig
from ctcovid.dicom.types import Series, SliceRef
from ctcovid.errors import InvalidInputError
from ctcovid.model.artifact import ModelArtifact, default_model_path, load_model, read_artifact
from ctcovid.model.runtimes import (
    KerasRuntime,
    Runtime,
    load_runtime,
    pin_keras_threads,
    resolve_runtime,
)
from ctcovid.preprocess import (
    assemble_series,
    iter_windowed,
)
from ctcovid.results import ScanResult
from ctcovid.scans import PreparedScan, prepare_scan, scan_result

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
#: Slices per model call, fixed: a batch's shape and its other slices can change a slice's
#: output in the last bits (other kernels, other blocking), so neither may depend on a setting.
SCORING_BATCH_SIZE = 16


def fixed_batches(slices: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """``(batch, n)`` for consecutive batches of exactly :data:`SCORING_BATCH_SIZE` slices from
    the first one; the last is padded with blank slices, and only its first ``n`` are real."""
    size = SCORING_BATCH_SIZE
    for start in range(0, len(slices), size):
        chunk = slices[start : start + size]
        n = len(chunk)
        if n < size:
            pad = np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        yield chunk, n


def scan_result_of(
    artifact: ModelArtifact, prepared: PreparedScan, probabilities: np.ndarray, seconds: float
) -> ScanResult:
    """The scan-level result under ``artifact``'s threshold and classes (no model needed)."""
    return scan_result(
        prepared,
        probabilities,
        ingest=artifact.ingest_config,
        threshold=artifact.threshold,
        classes=(artifact.positive_class, artifact.negative_class),
        model=artifact.info,
        seconds=seconds,
    )


class Classifier:
    """A loaded model with the preprocessing its artifact prescribes."""

    def __init__(
        self,
        model: Any,
        artifact: ModelArtifact,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        runtime: Runtime | None = None,
        model_path: Path | None = None,
    ):
        """``runtime`` defaults to Keras on ``model``; an exported graph's runtime is recorded
        in the artifact (result identity). ``model_path`` lets the Keras model be loaded on
        first use (class-activation maps) when another runtime does the scoring.
        ``batch_size`` sets how far decoding runs ahead of the model, not the model's batches
        (:data:`SCORING_BATCH_SIZE`), so it cannot change a result."""
        self._model = model
        self._model_path = model_path
        if runtime is None and model is not None:
            runtime = KerasRuntime(model)
        self.runtime = runtime
        if runtime is not None:
            artifact = artifact.with_runtime(runtime.name, runtime.graph_sha256)
        self.artifact = artifact
        self.batch_size = batch_size
        self._cam_model: Any = None

    @property
    def model(self) -> Any:
        """The Keras model (loaded on first use when another runtime scores the slices)."""
        if self._model is None and self._model_path is not None:
            pin_keras_threads()
            self._model, _ = load_model(self._model_path)
        return self._model

    @classmethod
    def from_file(
        cls, path: Path | str | None = None, *, runtime: str = "auto", **kwargs: Any
    ) -> Classifier:
        """Load a model folder for ``runtime`` (auto | keras | onnx | int8 | openvino | bf16,
        see runtimes.py). An exported graph's runtime imports neither Keras nor TensorFlow: a
        cheap start, heatmaps included when the graph carries its class-activation output."""
        path = Path(path) if path else default_model_path()
        if runtime == "keras":  # the common case: one read of the metadata
            pin_keras_threads()  # before Keras loads the model and TensorFlow starts its pools
            model, artifact = load_model(path)
            return cls(model, artifact, **kwargs)
        artifact = read_artifact(path)
        choice = resolve_runtime(path, artifact, runtime)
        if choice.name == "keras":
            pin_keras_threads()
            model, artifact = load_model(path)
            return cls(model, artifact, **kwargs)
        return cls(None, artifact, runtime=load_runtime(choice), model_path=path, **kwargs)

    @property
    def ingest_config(self) -> IngestConfig:
        return self.artifact.ingest_config

    @property
    def threshold(self) -> float:
        return self.artifact.threshold

    # -- slices -> probabilities ------------------------------------------------------------

    def predict_slices(self, slices: np.ndarray) -> np.ndarray:
        """P(COVID) per slice for the uint8 slices (N, S, S) of ONE series, in order.

        Scored in :func:`fixed_batches` counted from the first slice given: callers pass a
        series whole, or in parts that start at multiples of :data:`SCORING_BATCH_SIZE`, so
        that each slice meets the same batch every time. Never mix series in one call.
        """
        slices = np.asarray(slices)
        if slices.ndim != 3:
            raise ValueError(f"slices must have shape (N, S, S). Received: {slices.shape}.")
        size = self.artifact.model_config.input_size
        if slices.shape[1:] != (size, size):
            raise ValueError(
                f"slices must be {size}x{size} for this model. Received: {slices.shape[1:]}."
            )
        if self.runtime is None:
            raise ValueError("this Classifier has no model: it can prepare scans only")
        parts = [
            self.runtime.predict(chunk[..., np.newaxis].astype(np.float32))[:n]
            for chunk, n in fixed_batches(slices)
        ]
        return np.concatenate(parts) if parts else np.empty(0, np.float32)

    def class_activation_maps(self, slices: np.ndarray) -> np.ndarray:
        """CAM of the positive class per slice, (N, h, w) in [0, 1] on the feature grid.

        The head is GAP -> Dense, so the CAM is the fused feature map weighted by the Dense
        kernel (Zhou et al., 2016); ReLU then per-slice max normalisation. An exported graph
        computes the same product as its ``cam`` output (``ctcovid export``), so a graph's
        runtime needs no Keras for it; older graphs fall back to the Keras model.
        """
        graph = self.runtime if getattr(self.runtime, "cam_index", None) is not None else None
        maps = []
        if graph is not None:
            for chunk, n in fixed_batches(np.asarray(slices)):  # same batches as the scores
                x = chunk[..., np.newaxis].astype(np.float32)
                maps.append(graph.class_activation(x)[:n])  # type: ignore[attr-defined]
        else:
            from ctcovid.model.build import cam_model

            if self._cam_model is None:
                self._cam_model = cam_model(self.model)
            kernel = np.asarray(self.model.get_layer("p_covid").kernel, np.float32)[:, 0]
            for chunk, n in fixed_batches(np.asarray(slices)):
                features, _ = self._cam_model(
                    [chunk[..., np.newaxis].astype(np.float32)], training=False
                )
                cam = np.tensordot(np.asarray(features, np.float32), kernel, axes=([-1], [0]))
                maps.append(cam[:n])
        cams = np.maximum(np.concatenate(maps), 0.0)
        peak = cams.reshape(len(cams), -1).max(axis=1)
        return cams / np.where(peak > 0, peak, 1.0)[:, None, None]

    # -- series -> result ---------------------------------------------------------------------

    def result(
        self, prepared: PreparedScan, probabilities: np.ndarray, seconds: float
    ) -> ScanResult:
        """The scan-level result under this model's threshold and classes."""
        return scan_result_of(self.artifact, prepared, probabilities, seconds)

    def classify(self, series: Series) -> ScanResult:
        """Classify one assessed, usable series."""
        return self.run(series)[1]

    def run(self, series: Series) -> tuple[PreparedScan, ScanResult]:
        """Classify one series and return what the model saw with the result (for heatmaps).

        With the slice policy ``all`` and no ``max_slices`` every decoded slice is used, so each
        batch goes to the model as soon as it is decoded while decode threads work on the next
        ones. Other policies choose slices from the whole series, so it is decoded first.
        """
        start = time.perf_counter()
        config = self.ingest_config
        if config.slice_policy != "all" or config.max_slices is not None:
            prepared = prepare_scan(series, config)
            probs = self.predict_slices(prepared.used.slices)
            return prepared, self.result(prepared, probs, time.perf_counter() - start)
        if not series.usable:  # refuse before decoding anything
            raise InvalidInputError(
                f"Series {series.series_instance_uid} is not usable: {series.reason}"
            )
        errors: list[str] = []
        parts: list[np.ndarray] = []
        windowed = iter_windowed(series.slices, config, errors, lookahead=2 * self.batch_size)
        pp = assemble_series(series, config, self._scored(windowed, parts), errors)
        prepared = prepare_scan(series, config, pp)
        probs = np.concatenate(parts)[: len(prepared.used)]
        return prepared, self.result(prepared, probs, time.perf_counter() - start)

    def _scored(
        self, windowed: Iterable[tuple[SliceRef, np.ndarray]], parts: list[np.ndarray]
    ) -> Iterator[tuple[SliceRef, np.ndarray]]:
        """Pass slices through, scoring them batch by batch into ``parts`` on the way.

        Parts start at multiples of :data:`SCORING_BATCH_SIZE`, so the model calls are those
        of scoring the series whole (:meth:`predict_slices`).
        """
        batch: list[np.ndarray] = []
        for ref, u8 in windowed:
            batch.append(u8)
            yield ref, u8
            if len(batch) == SCORING_BATCH_SIZE:
                parts.append(self.predict_slices(np.stack(batch)))
                batch = []
        if batch:
            parts.append(self.predict_slices(np.stack(batch)))
