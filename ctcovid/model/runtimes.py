"""How a model folder is run: Keras, or an exported graph on ONNX Runtime (fp32 or int8).

The runtime is a detail behind ``Classifier.predict_slices``: each one maps a float32 batch of
slices (N, S, S, 1) in [0, 255] to P(COVID) per slice. Keras is the reference (and the training
engine); ``ctcovid export`` adds graphs to the folder, recorded in ``ctcovid.json`` with their
sha256 and the weights they came from.

``auto`` picks, among the runtimes whose graph the folder holds, the first of :data:`AUTO_ORDER`:
``int8`` (a calibrated graph that passed the accuracy gate at export), then ``onnx`` (fp32), then
``keras``. Without ONNX Runtime installed ``auto`` falls back to Keras and says so in the log.

Threads are pinned (:func:`scoring_threads`): a runtime that splits a reduction among another
number of threads may sum in another order, and the last bits of a probability would follow the
load of the machine or a setting instead of the slice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ctcovid.errors import ModelError
from ctcovid.model.artifact import METADATA_FILE, ModelArtifact, sha256_file

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "onnx", "int8")
# Fastest first; measured in bench/run.py ("runtimes" section) and the README's table.
AUTO_ORDER = ("int8", "onnx", "keras")
GRAPH_FILES = {"onnx": "model.onnx", "int8": "model.int8.onnx"}
INSTALL_HINT = "install the ONNX extra: pip install 'ctcovid[onnx]'"


def scoring_threads() -> int:
    """Intra-op threads of every runtime: the machine's CPU count, whatever process asks.

    Not the process's affinity or a share of the batch workers: those differ between the node,
    batch and classify on one machine, and the numbers must not.
    """
    return os.cpu_count() or 1


def pin_keras_threads(threads: int | None = None) -> None:
    """Pin TensorFlow's intra-op threads (Keras on the TensorFlow backend) before it starts.

    TensorFlow fixes its thread pools when it first runs; once started they cannot change, and
    a warning says so when they differ. Other Keras backends are left as they are.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    threads = threads or scoring_threads()
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if current == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        logger.warning(
            "TensorFlow started with %d intra-op thread(s) (0: its default) before ctcovid could "
            "pin %d; scores stay reproducible within this process only",
            current,
            threads,
        )


class Runtime(Protocol):
    """What ``Classifier.predict_slices`` needs from an inference engine."""

    name: str
    graph_sha256: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(COVID) per slice, shape (N,), for float32 slices (N, S, S, 1)."""
        ...


class KerasRuntime:
    """The Keras model itself (``predict_on_batch``, a compiled predict function)."""

    name = "keras"
    graph_sha256 = ""

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(x), np.float32).reshape(-1)


class OnnxRuntime:
    """An exported graph on ONNX Runtime's CPU execution provider, on pinned threads."""

    def __init__(self, path: Path, name: str, graph_sha256: str, threads: int | None = None):
        ort = import_onnxruntime(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or scoring_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"{path}: ONNX Runtime cannot load the graph ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.name = name
        self.graph_sha256 = graph_sha256
        self.path = path

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out[0], np.float32).reshape(-1)


def import_onnxruntime(why: str = "onnx") -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            f"runtime {why!r} needs ONNX Runtime, which is not installed; {INSTALL_HINT}"
        ) from exc
    return onnxruntime


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class RuntimeChoice:
    """A resolved runtime: its name and, for an exported graph, the verified file."""

    name: str
    path: Path | None = None
    graph_sha256: str = ""


def check_runtime_name(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    return runtime


def graph_path(folder: Path, artifact: ModelArtifact, runtime: str, *, verify: bool = True) -> Path:
    """The verified graph file of ``runtime`` in a model folder.

    Raises :class:`ModelError` when the graph is not recorded, missing, exported from other
    weights, or its sha256 differs from ``ctcovid.json``.
    """
    record = artifact.graphs.get(runtime)
    if record is None:
        raise ModelError(
            f"{folder}: no {runtime!r} graph recorded in {METADATA_FILE}; create it with "
            f"'ctcovid export {folder}"
            + (" --int8 --calibration DATA'" if runtime == "int8" else "'")
        )
    path = folder / str(record.get("file", GRAPH_FILES[runtime]))
    if not path.is_file():
        raise ModelError(f"{path}: the {runtime!r} graph recorded in {METADATA_FILE} is missing")
    if record.get("weights_sha256") != artifact.weights_sha256:
        raise ModelError(
            f"{path}: exported from other weights (weights_sha256 "
            f"{str(record.get('weights_sha256'))[:12]} vs {artifact.weights_sha256[:12]} in "
            f"{METADATA_FILE}); re-run 'ctcovid export {folder}'"
        )
    if verify and sha256_file(path) != record.get("sha256"):
        raise ModelError(
            f"{path}: graph does not match {METADATA_FILE} (sha256 differs from the recorded "
            f"{str(record.get('sha256'))[:12]}...); the model folder was modified or copied "
            f"incompletely; re-run 'ctcovid export {folder}'"
        )
    return path


def resolve_runtime(
    folder: Path, artifact: ModelArtifact, requested: str = "auto"
) -> RuntimeChoice:
    """Which runtime ``requested`` means for this model folder (graphs verified, none loaded)."""
    check_runtime_name(requested)
    folder = Path(folder)
    if requested == "auto":
        present = [r for r in AUTO_ORDER if r == "keras" or r in artifact.graphs]
        if present[0] != "keras" and not onnxruntime_available():
            logger.warning(
                "model %s holds %s graph(s) but ONNX Runtime is not installed: using Keras (%s)",
                folder,
                ", ".join(present[:-1]),
                INSTALL_HINT,
            )
            present = ["keras"]
        requested = present[0]
    if requested == "keras":
        return RuntimeChoice("keras")
    path = graph_path(folder, artifact, requested)
    return RuntimeChoice(requested, path, str(artifact.graphs[requested]["sha256"]))


def load_runtime(choice: RuntimeChoice, model: Any = None) -> Runtime:
    """Open the runtime of ``choice`` (``model`` is the Keras model for ``keras``)."""
    if choice.name == "keras":
        if model is None:
            raise ModelError("the keras runtime needs the Keras model")
        return KerasRuntime(model)
    assert choice.path is not None
    return OnnxRuntime(choice.path, choice.name, choice.graph_sha256)
