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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.config import IngestConfig
from ctcovid.dicom.types import Series, SliceRef
from ctcovid.errors import InvalidInputError
from ctcovid.model.artifact import ModelArtifact, default_model_path, load_model, read_artifact
from ctcovid.model.runtimes import (
    SCORING_BATCH_SIZE,
    KerasRuntime,
    Runtime,
    check_runtime_name,
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


def normalised_maps(cams: np.ndarray) -> np.ndarray:
    """Class-activation maps (N, h, w) as heatmaps: ReLU, then each map over its own peak."""
    cams = np.maximum(np.asarray(cams, np.float32), 0.0)
    peak = cams.reshape(len(cams), -1).max(axis=1) if len(cams) else np.empty(0, np.float32)
    return cams / np.where(peak > 0, peak, 1.0)[:, None, None]


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
        loading: Future[Classifier] | None = None,
    ):
        """``runtime`` defaults to Keras on ``model``; an exported graph's runtime is recorded
        in the artifact (result identity). ``model_path`` lets the Keras model be loaded on
        first use (class-activation maps) when another runtime does the scoring.
        ``batch_size`` sets how far decoding runs ahead of the model, not the model's batches
        (:data:`SCORING_BATCH_SIZE`), so it cannot change a result. ``loading`` is the model
        still being loaded (:meth:`from_file` with ``background``): the first use of the
        runtime waits for it, and a failure to load is raised there."""
        self._model = model
        self._model_path = model_path
        self._loading = loading
        self._ingest_artifact = artifact  # the preprocessing: known before the model is loaded
        self._runtime: Runtime | None = None
        self._artifact = artifact
        if loading is None:
            self._use_runtime(runtime)
        self.batch_size = batch_size
        self._cam_model: Any = None

    def _use_runtime(self, runtime: Runtime | None) -> None:
        if runtime is None and self._model is not None:
            runtime = KerasRuntime(self._model)
        self._runtime = runtime
        if runtime is not None:
            self._artifact = self._ingest_artifact.with_runtime(runtime.name, runtime.graph_sha256)

    def wait_loaded(self) -> None:
        """Wait for a model loading in the background; its failure (:class:`ModelError`) is
        raised here."""
        self._loaded()

    def _loaded(self) -> None:
        """Take over the model loaded in the background, once (waits for it)."""
        if self._loading is not None:
            loaded = self._loading.result()  # the loader's ModelError, raised here
            self._loading = None
            self._model, self._model_path = loaded._model, loaded._model_path
            self._ingest_artifact = loaded._ingest_artifact
            self._use_runtime(loaded._runtime)

    @property
    def runtime(self) -> Runtime | None:
        """The engine that scores the slices (waits for a model loading in the background)."""
        self._loaded()
        return self._runtime

    @property
    def artifact(self) -> ModelArtifact:
        """The model's metadata, with the runtime that scores (waits for a background load)."""
        self._loaded()
        return self._artifact

    @property
    def model(self) -> Any:
        """The Keras model (loaded on first use when another runtime scores the slices)."""
        self._loaded()
        if self._model is None and self._model_path is not None:
            pin_keras_threads()
            self._model, _ = load_model(self._model_path)
        return self._model

    @classmethod
    def from_file(
        cls,
        path: Path | str | None = None,
        *,
        runtime: str = "auto",
        background: bool = False,
        **kwargs: Any,
    ) -> Classifier:
        """Load a model folder for ``runtime`` (auto | keras | onnx | int8 | openvino | bf16 |
        openvino-int8, see runtimes.py). An exported graph's runtime imports neither Keras nor
        TensorFlow: a cheap start, heatmaps included when the graph carries its class-activation
        output.

        With ``background`` only the metadata is read now (a folder that is no model fails
        here); the graph is verified, compiled and checked in a thread while the caller reads
        and decodes the series, and the first model call waits for it. One-shot commands
        (``classify``) use it: the load is mostly one core's work. (On two cores, where the
        whole command keeps both busy, it was measured to gain nothing noticeable.)
        """
        path = Path(path) if path else default_model_path()
        if background:
            artifact = read_artifact(path)
            check_runtime_name(runtime)
            pool = ThreadPoolExecutor(1, thread_name_prefix="model-load")
            loading = pool.submit(cls.from_file, path, runtime=runtime, **kwargs)
            pool.shutdown(wait=False)
            return cls(None, artifact, model_path=path, loading=loading, **kwargs)
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
        """The preprocessing the model prescribes (known before a background load ends)."""
        return self._ingest_artifact.ingest_config

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
        return self.score(slices)[0]

    def score(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_slices`, and the unnormalised class-activation map per slice
        (N, h, w) when the runtime's graph computes it in the same run (else ``None``).

        The probabilities are the same bytes either way; keeping the maps spares heatmaps and
        the result card a second model run on the key slices.
        """
        slices = np.asarray(slices)
        if slices.ndim != 3:
            raise ValueError(f"slices must have shape (N, S, S). Received: {slices.shape}.")
        size = self.artifact.model_config.input_size
        if slices.shape[1:] != (size, size):
            raise ValueError(
                f"slices must be {size}x{size} for this model. Received: {slices.shape[1:]}."
            )
        runtime = self.runtime
        if runtime is None:
            raise ValueError("this Classifier has no model: it can prepare scans only")
        with_cam = getattr(runtime, "predict_with_cam", None)
        if getattr(runtime, "cam_index", None) is None:
            with_cam = None
        parts, maps = [], []
        for chunk, n in fixed_batches(slices):
            x = chunk[..., np.newaxis].astype(np.float32)
            if with_cam is not None:
                p, cam = with_cam(x)
                maps.append(cam[:n])
            else:
                p = runtime.predict(x)
            parts.append(p[:n])
        if not parts:
            return np.empty(0, np.float32), None
        return np.concatenate(parts), np.concatenate(maps) if maps else None

    def key_slice_maps(self, prepared: PreparedScan, indices: Any) -> np.ndarray:
        """Normalised class-activation maps of the used slices at ``indices`` (heatmaps, the
        result card): from the scoring run when it kept them (:attr:`PreparedScan.cams`),
        else computed now (:meth:`class_activation_maps`)."""
        indices = list(indices)
        if prepared.cams is not None and len(prepared.cams) == len(prepared.used):
            return normalised_maps(prepared.cams[indices])
        return self.class_activation_maps(prepared.used.slices[indices])

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
        return normalised_maps(np.concatenate(maps))

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
            probs, prepared.cams = self.score(prepared.used.slices)
            return prepared, self.result(prepared, probs, time.perf_counter() - start)
        if not series.usable:  # refuse before decoding anything
            raise InvalidInputError(
                f"Series {series.series_instance_uid} is not usable: {series.reason}"
            )
        errors: list[str] = []
        parts: list[tuple[np.ndarray, np.ndarray | None]] = []
        windowed = iter_windowed(series.slices, config, errors, lookahead=2 * self.batch_size)
        pp = assemble_series(series, config, self._scored(windowed, parts), errors)
        prepared = prepare_scan(series, config, pp)
        probs = np.concatenate([p for p, _ in parts])[: len(prepared.used)]
        if parts and all(cam is not None for _, cam in parts):
            prepared.cams = np.concatenate([cam for _, cam in parts])[: len(prepared.used)]
        return prepared, self.result(prepared, probs, time.perf_counter() - start)

    def _scored(
        self,
        windowed: Iterable[tuple[SliceRef, np.ndarray]],
        parts: list[tuple[np.ndarray, np.ndarray | None]],
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
                parts.append(self.score(np.stack(batch)))
                batch = []
        if batch:
            parts.append(self.score(np.stack(batch)))
