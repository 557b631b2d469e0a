"""How a model folder is run: Keras, or an exported graph on ONNX Runtime or OpenVINO.

The runtime is a detail behind ``Classifier.predict_slices``: each one maps a float32 batch of
slices (N, S, S, 1) in [0, 255] to P(COVID) per slice. Keras is the reference (and the training
engine); ``ctcovid export`` adds graphs to the folder, recorded in ``ctcovid.json`` with their
sha256 and the weights they came from.

- ``keras``: the Keras model (``predict_on_batch``);
- ``onnx``: ``model.onnx`` (fp32) on ONNX Runtime;
- ``int8``: ``model.int8.onnx`` (QDQ, calibrated) on ONNX Runtime, gated against fp32;
- ``openvino``: ``model.onnx`` on OpenVINO's CPU plugin, ``INFERENCE_PRECISION_HINT`` f32;
- ``bf16``: ``model.onnx`` on OpenVINO with ``INFERENCE_PRECISION_HINT`` bf16 (AMX-BF16 or
  AVX512-BF16 products, no calibration), gated against fp32 like int8. Only on a CPU with BF16
  instructions: elsewhere OpenVINO would quietly compute in f32.
- ``openvino-int8``: ``model.int8.onnx`` on OpenVINO, its other operators at
  ``INFERENCE_PRECISION_HINT`` f32 (so it runs on CPUs without BF16). OpenVINO does the int8
  arithmetic with its own kernels (oneDNN: AMX-INT8, AVX512-VNNI, AVX-VNNI, AVX2), not ONNX
  Runtime's, so the int8 gate does not cover it: it has its own gate (``ctcovid export --int8``
  runs it where OpenVINO is installed) and its own load check, under its own record.

``auto`` picks, among the runtimes whose graph the folder holds, the first of :data:`AUTO_ORDER`
(fastest first where the CPU has them, measured in ``make bench``): ``bf16`` (no calibration,
as fast as int8 where AMX does both), ``openvino-int8`` (twice ONNX Runtime's speed on the same
int8 graph where it was measured), ``int8``, ``onnx``, ``keras``. ``bf16`` comes first only on a
CPU with AMX-BF16 tiles (:func:`auto_order`): with AVX512-BF16 dot products alone (AMD Zen 4,
Intel Cooper Lake) OpenVINO's bf16 kernels ran slower than its f32 ones, so there ``auto``
passes over a bf16 graph with one info line and ``--runtime bf16`` still runs it. Without ONNX
Runtime installed ``auto`` falls back to Keras and says so in the log. ``auto`` takes a gated graph
(:data:`GATED`: bf16, openvino-int8, int8) only when it is ``verified`` (its gate was confirmed
on validation scans) and it passes the load check (:func:`check_graph`): the CPU's arithmetic
for it (:data:`ARITHMETIC`; int8: VNNI, AMX; bf16: AMX-BF16, AVX512-BF16; openvino-int8:
AMX-INT8, VNNI, AVX-512) is the one the gate ran on, and the graph reproduces the logits
recorded for a few slices (:data:`CHECK_FILES`). Else it takes the next one and logs one
warning naming the reason. An explicit gated runtime runs its graph in any case, with one
warning when it is unverified or fails the load check; ``bf16`` on a CPU without BF16 is
refused.

``ctcovid export`` saves OpenVINO's compiled model of bf16 and openvino-int8 next to their graph
(:data:`COMPILED_FILES`); a load on the same OpenVINO, CPU and thread count imports it instead
of compiling the graph (:func:`compiled_blob`), and the load check runs on it all the same.

Threads are pinned (:func:`scoring_threads`): a runtime that splits a reduction among another
number of threads may sum in another order, and the last bits of a probability would follow the
load of the machine or a setting instead of the slice.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ctcovid.errors import ModelError
from ctcovid.model.artifact import METADATA_FILE, ModelArtifact, sha256_file

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "onnx", "int8", "openvino", "bf16", "openvino-int8")
# Fastest first; measured in bench/run.py ("runtimes" section) and the README's table. OpenVINO
# f32 is asked for by name only: it gains little over ONNX Runtime fp32 where it was measured.
AUTO_ORDER = ("bf16", "openvino-int8", "int8", "onnx", "keras")
#: Why bf16 needs AMX-BF16 to be worth taking: with OpenVINO's kernels held to AVX512-BF16
#: (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, the dot products of AMD Zen 4 and Intel Cooper
#: Lake) on the AMX machine, the 256 px graphs ran bf16 6.8 slices/s, f32 8.9 and the int8 graph
#: 27.7; with AMX tiles bf16 ran 55.
NO_AMX_BF16 = (
    "this CPU has no AMX-BF16 tiles, and without them OpenVINO's bf16 kernels ran slower than "
    "its f32 ones; --runtime bf16 still runs it"
)
GRAPH_FILES = {
    "onnx": "model.onnx",
    "int8": "model.int8.onnx",
    "openvino": "model.onnx",
    "bf16": "model.onnx",
    "openvino-int8": "model.int8.onnx",
}
#: Runtimes that run another runtime's recorded graph: ``openvino`` runs the fp32 graph as it is.
GRAPH_OF = {"openvino": "onnx"}
#: Runtimes whose numbers are gated against fp32 at export and verified per CPU at load. Each
#: has its own record in ``ctcovid.json`` (``openvino-int8`` too: another engine's arithmetic
#: on the int8 graph file).
GATED = ("int8", "bf16", "openvino-int8")
#: Runtimes that need OpenVINO (the others need ONNX Runtime, or Keras).
OPENVINO_RUNTIMES = ("openvino", "bf16", "openvino-int8")
#: A few slices with the fp32 and gated logits the gate measured: the load check of each.
CHECK_FILES = {
    "int8": "model.int8.check.npz",
    "bf16": "model.bf16.check.npz",
    "openvino-int8": "model.openvino-int8.check.npz",
}
CHECK_FILE = CHECK_FILES["int8"]
#: OpenVINO's compiled model of a gated OpenVINO runtime, saved by ``ctcovid export`` and
#: imported at load instead of compiling the graph, where OpenVINO, the CPU, the threads and
#: the settings are those it was compiled with (:func:`compiled_blob`).
COMPILED_FILES = {
    "bf16": "model.bf16.blob",
    "openvino-int8": "model.openvino-int8.blob",
}
#: |int8 logit now - int8 logit at export| allowed on the check slices, times max(1, |logit|):
#: the same kernels give the same logits to rounding; other kernels (VNNI against AVX2's
#: saturating U8S8 products) give other ones.
CHECK_LOGIT_TOLERANCE = 0.05
VERIFIED = "verified"
UNVERIFIED = "unverified"
#: The CPU flags that select ONNX Runtime's int8 kernels (the int8 arithmetic) and OpenVINO's
#: bf16 and int8 kernels (AVX512-BF16 dot products, AMX-BF16 and AMX-INT8 tiles, VNNI).
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "avx512_bf16",
    "amx_bf16",
)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_NUMPY_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512VNNI",
}
#: Slices per model call, fixed: a batch's shape and its other slices can change a slice's
#: output in the last bits (other kernels, other blocking), so neither may depend on a setting.
#: OpenVINO compiles its graphs for exactly this batch (:class:`OpenVinoRuntime`).
SCORING_BATCH_SIZE = 16
#: The exported graphs' class-activation output (``ctcovid.model.export.add_cam_output``).
CAM_OUTPUT = "cam"
INSTALL_HINT = "install the ONNX extra: pip install 'ctcovid[onnx]'"
OPENVINO_INSTALL_HINT = "install the ONNX extra, which brings OpenVINO: pip install 'ctcovid[onnx]'"


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
        outputs = [o.name for o in self.session.get_outputs()]
        self.cam_index = outputs.index(CAM_OUTPUT) if CAM_OUTPUT in outputs else None
        self.name = name
        self.graph_sha256 = graph_sha256
        self.path = path

    def predict(self, x: np.ndarray) -> np.ndarray:
        # Every output (the logit too): the same run as the gate measured.
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out[0], np.float32).reshape(-1)

    def predict_with_logits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(COVID) and the logit (the sigmoid's input) per slice, from one run.

        Graphs exported by ``ctcovid export`` carry the logit as their second output; for an
        older graph it is computed back from the probability (inexact where that saturates).
        """
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        p = np.asarray(out[0], np.float32).reshape(-1)
        if len(out) > 1:
            return p, np.asarray(out[1], np.float32).reshape(-1)
        return p, logit(p)

    def class_activation(self, x: np.ndarray) -> np.ndarray:
        """The graph's class-activation map per slice, (N, h, w), unnormalised; graphs exported
        with it only (:attr:`cam_index` not ``None``)."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return cam_of(out, self.cam_index)

    def predict_with_cam(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """P(COVID) (the bytes of :meth:`predict`) and the class-activation map per slice from
        the same run: the map costs nothing more (``None`` for a graph without it)."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        cam = cam_of(out, self.cam_index) if self.cam_index is not None else None
        return np.asarray(out[0], np.float32).reshape(-1), cam


def cam_of(outputs: list[Any], index: int | None) -> np.ndarray:
    """The class-activation output (N, h, w, 1) among a graph's outputs, as (N, h, w)."""
    if index is None:
        raise ModelError("this graph has no class-activation output; re-run 'ctcovid export'")
    cam = np.asarray(outputs[index], np.float32)
    return cam.reshape(cam.shape[:3])


class OpenVinoRuntime:
    """An exported ONNX graph on OpenVINO's CPU plugin at a precision hint, on pinned threads.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32`` is stated even for the
    fp32 runtime, because on a CPU with AMX OpenVINO's default is bf16. One stream and a fixed
    thread count: the same reduction order whatever the load. One inference request, used under
    a lock (a request is not thread-safe; the cores are all in use by one call anyway).

    The graph is compiled for a static batch of ``batch`` slices (:data:`SCORING_BATCH_SIZE`,
    the batch ``Classifier`` always gives): with the batch dimension left dynamic, OpenVINO's CPU
    plugin picks generic kernels, measured 10 % slower for bf16 and 1.8 times slower for the
    int8 graph on an Intel Xeon with AMX, with the same output bytes. Other batch sizes are run
    in chunks of ``batch``, the last one padded with blank slices. ``batch=None`` leaves the
    batch dynamic (a comparison in the tests).

    ``blob``: the bytes of a compiled model this class exported (:meth:`export_compiled`),
    imported instead of reading and compiling the graph (2.8 s for the 256 px int8 graph on an
    Intel Xeon with AMX); ``path`` then only names the graph in messages. OpenVINO imports it
    from the array itself (no copy: 0.3 s less for a 200 MB blob than from ``bytes``), which
    this runtime keeps for as long as it lives.
    """

    def __init__(
        self,
        path: Path,
        name: str,
        graph_sha256: str,
        precision: str = "f32",
        threads: int | None = None,
        batch: int | None = SCORING_BATCH_SIZE,
        blob: np.ndarray | None = None,
    ):
        ov = import_openvino(name)
        self.config = openvino_config(precision, threads)
        try:
            core = ov.Core()
            if blob is not None:
                stream = ov.Tensor(np.ascontiguousarray(blob, np.uint8), shared_memory=True)
                self.compiled = core.import_model(stream, "CPU", self.config)
            else:
                model = core.read_model(str(path))
                shape = model.inputs[0].get_partial_shape()
                if batch and shape.rank.is_static and all(d.is_static for d in list(shape)[1:]):
                    model.reshape({model.inputs[0]: ov.PartialShape([batch, *list(shape)[1:]])})
                self.compiled = core.compile_model(model, "CPU", self.config)
        except Exception as exc:
            what = "import the graph's compiled model" if blob is not None else "load the graph"
            raise ModelError(f"{path}: OpenVINO cannot {what} ({exc})") from exc
        #: How the graph was opened: ``"compiled"`` from the graph file, or ``"imported"`` from
        #: the compiled model saved at export (:data:`COMPILED_FILES`).
        self.opened = "imported" if blob is not None else "compiled"
        self._blob = blob  # the memory the imported model was read from
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()
        names = [o.get_names() for o in self.compiled.outputs]
        self.cam_index = next((i for i, n in enumerate(names) if CAM_OUTPUT in n), None)
        self.name = name
        self.graph_sha256 = graph_sha256
        self.path = path
        self.precision = precision

        self.batch = batch if self.compiled.inputs[0].get_partial_shape().is_static else None

    def export_compiled(self, out: Path) -> dict[str, Any]:
        """Write the compiled model to ``out`` (OpenVINO's ``export_model``); returns the
        ``compiled`` record that lets a load on the same OpenVINO, CPU, threads and settings
        import it instead of compiling (:func:`compiled_blob`)."""
        import openvino as ov

        stream = io.BytesIO()
        self.compiled.export_model(stream)
        data = stream.getbuffer()
        out.write_bytes(data)
        return {
            "file": out.name,
            "sha256": hashlib.sha256(data).hexdigest(),  # of the bytes written, not read back
            "graph_sha256": self.graph_sha256,
            "openvino": ov.get_version(),
            "cpu": current_cpu(),
            "threads": self.config["INFERENCE_NUM_THREADS"],
            "batch": self.batch,
            "config": dict(self.config),
        }

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        if self.batch is None or len(x) == self.batch:
            return self._infer(x)
        parts = []
        for start in range(0, len(x), self.batch):
            chunk = x[start : start + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *x.shape[1:]), x.dtype)])
            parts.append([o[:n] for o in self._infer(chunk)])
        if not parts:  # no slices: the output shapes of an empty batch
            return [o[:0] for o in self._infer(np.zeros((self.batch, *x.shape[1:]), x.dtype))]
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            out = self._request.infer({0: x})
            # Copies: the request's output tensors are overwritten by its next call.
            return [np.array(out[o], np.float32) for o in self.compiled.outputs]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[0].reshape(-1)

    def predict_with_logits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(COVID) and the logit per slice, from one run (as :class:`OnnxRuntime`)."""
        out = self._run(x)
        p = out[0].reshape(-1)
        if len(out) > 1:
            return p, out[1].reshape(-1)
        return p, logit(p)

    def class_activation(self, x: np.ndarray) -> np.ndarray:
        """As :meth:`OnnxRuntime.class_activation`."""
        return cam_of(self._run(x), self.cam_index)

    def predict_with_cam(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """As :meth:`OnnxRuntime.predict_with_cam`."""
        out = self._run(x)
        cam = cam_of(out, self.cam_index) if self.cam_index is not None else None
        return out[0].reshape(-1), cam


def openvino_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """OpenVINO's CPU settings of a runtime: the one place that states them, for a compile at
    load, the compiled model saved at export and the check that a saved one applies here."""
    return {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads or scoring_threads(),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    }


def compiled_blob(folder: Path, record: dict[str, Any], precision: str) -> np.ndarray | None:
    """The compiled model recorded under ``record["compiled"]``, when it applies here.

    It applies when it was compiled from the graph file the record names (its sha256, checked
    by :func:`graph_path`), this OpenVINO version, this CPU (:func:`cpu_description`: model and
    flags), the thread count, the batch and OpenVINO's settings are the recorded ones, and the
    file's sha256 is the recorded one: then its bytes come back (read once, hashed while read),
    else ``None`` with one log line: info when it was made for another machine or OpenVINO,
    warning when the file is missing or changed, or was compiled from another graph. The load
    check then runs on whichever model was opened, so a blob that computes differently still
    fails it.
    """
    compiled = record.get("compiled")
    if not isinstance(compiled, dict):
        return None
    import openvino as ov

    path = folder / str(compiled.get("file"))
    if compiled.get("graph_sha256") != record.get("sha256"):
        logger.warning(
            "%s: compiled from another graph than the recorded %s (sha256 %s..., not %s...); "
            "compiling the graph instead; re-run 'ctcovid export %s'",
            path,
            record.get("file"),
            str(compiled.get("graph_sha256"))[:12],
            str(record.get("sha256"))[:12],
            folder,
        )
        return None
    differ = [
        what
        for what, recorded, here in (
            ("OpenVINO version", compiled.get("openvino"), ov.get_version()),
            ("CPU", compiled.get("cpu"), current_cpu()),
            ("thread count", compiled.get("threads"), scoring_threads()),
            ("batch", compiled.get("batch"), SCORING_BATCH_SIZE),
            ("OpenVINO settings", compiled.get("config"), openvino_config(precision)),
        )
        if recorded != here
    ]
    if differ:
        logger.info(
            "%s: compiled for another %s; compiling the graph instead",
            path,
            " and ".join(differ),
        )
        return None
    if not path.is_file():
        logger.warning(
            "%s: the compiled model recorded in %s is missing; compiling the graph instead; "
            "re-run 'ctcovid export %s'",
            path,
            METADATA_FILE,
            folder,
        )
        return None
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            blob = np.empty(os.fstat(f.fileno()).st_size, np.uint8)
            view, done = blob.data, 0
            while done < len(blob) and (n := f.readinto(view[done : done + (1 << 22)])):
                digest.update(view[done : done + n])
                done += n
        if done != len(blob):
            raise OSError(f"read {done} of {len(blob)} bytes")
    except OSError as exc:
        logger.warning(
            "%s: the compiled model recorded in %s cannot be read (%s); compiling the graph "
            "instead; re-run 'ctcovid export %s'",
            path,
            METADATA_FILE,
            exc.strerror or exc,
            folder,
        )
        return None
    if digest.hexdigest() != compiled.get("sha256"):
        logger.warning(
            "%s: does not match %s (sha256 differs from the recorded %s...); compiling the "
            "graph instead; re-run 'ctcovid export %s'",
            path,
            METADATA_FILE,
            str(compiled.get("sha256"))[:12],
            folder,
        )
        return None
    return blob


def import_openvino(why: str = "openvino") -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ModelError(
            f"runtime {why!r} needs OpenVINO, which is not installed; {OPENVINO_INSTALL_HINT}"
        ) from exc
    return openvino


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


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
    # The graph's session when resolving already opened it (the int8 load check): reused.
    loaded: Runtime | None = field(default=None, compare=False, repr=False)


def check_runtime_name(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    return runtime


def graph_path(folder: Path, artifact: ModelArtifact, runtime: str, *, verify: bool = True) -> Path:
    """The verified graph file of ``runtime`` in a model folder.

    Raises :class:`ModelError` when the graph is not recorded, missing, exported from other
    weights, or its sha256 differs from ``ctcovid.json``.
    """
    runtime = GRAPH_OF.get(runtime, runtime)
    record = artifact.graphs.get(runtime)
    if record is None:
        how = {
            "int8": " --int8 --calibration DATA --validation DATA'",
            "bf16": " --bf16 --validation DATA'",
            "openvino-int8": " --int8 --calibration DATA --validation DATA' with OpenVINO "
            "installed",
        }.get(runtime, "'")
        raise ModelError(
            f"{folder}: no {runtime!r} graph recorded in {METADATA_FILE}; create it with "
            f"'ctcovid export {folder}{how}"
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


def _fallback_words(name: str) -> str:
    if name in ("keras", *GATED):
        return name
    return f"the fp32 graph {GRAPH_FILES[name]}"


def bf16_passed_over(cpu: dict[str, Any]) -> str:
    """Why ``auto`` leaves bf16 out on ``cpu`` ('' where it takes it first): no BF16
    instructions (or none readable), or BF16 dot products without AMX-BF16 tiles."""
    missing = bf16_missing(cpu)
    if missing:
        return missing
    return NO_AMX_BF16 if bf16_arithmetic(cpu)["amx_bf16"] is False else ""


def auto_order(cpu: dict[str, Any]) -> tuple[str, ...]:
    """``auto``'s order on ``cpu``: :data:`AUTO_ORDER`, without bf16 where
    :func:`bf16_passed_over` gives a reason."""
    if bf16_passed_over(cpu):
        return tuple(r for r in AUTO_ORDER if r != "bf16")
    return AUTO_ORDER


def resolve_runtime(
    folder: Path, artifact: ModelArtifact, requested: str = "auto"
) -> RuntimeChoice:
    """Which runtime ``requested`` means for this model folder (graphs verified).

    For a gated graph (:data:`GATED`; asked for, or a choice of ``auto``) the graph is
    opened and checked on a few slices (:func:`check_graph`); the session comes back in the
    choice for :func:`load_runtime`.
    """
    check_runtime_name(requested)
    folder = Path(folder)
    if requested == "auto":
        present = [r for r in AUTO_ORDER if r == "keras" or r in artifact.graphs]
        passed_over = bf16_passed_over(current_cpu()) if "bf16" in present else ""
        if passed_over:
            present.remove("bf16")
            logger.info(
                "model %s: auto passes over the bf16 graph (%s); it goes on with %s",
                folder,
                passed_over,
                _fallback_words(present[0]),
            )
        if present[0] != "keras" and not onnxruntime_available():
            logger.warning(
                "model %s holds %s graph(s) but ONNX Runtime is not installed: using Keras (%s)",
                folder,
                ", ".join(present[:-1]),
                INSTALL_HINT,
            )
            present = ["keras"]
        while present[0] in GATED:
            name = present[0]
            path = graph_path(folder, artifact, name)
            reason = unverified_reason(artifact.graphs[name])
            if reason:
                logger.info(
                    "model %s: the %s graph is %s (%s); auto uses %s",
                    folder,
                    name,
                    UNVERIFIED,
                    reason,
                    present[1],
                )
            else:
                runtime, reason = check_graph(folder, artifact, name, path)
                if not reason and runtime is not None:
                    logger.info(
                        "model %s: auto uses the %s graph (verified; its load check passed on "
                        "this CPU)",
                        folder,
                        name,
                    )
                    return RuntimeChoice(name, path, runtime.graph_sha256, loaded=runtime)
                logger.warning(
                    "model %s: %s graph not used, %s; auto falls back to %s",
                    folder,
                    name,
                    reason,
                    _fallback_words(present[1]),
                )
            present = present[1:]
        requested = present[0]
    if requested == "keras":
        return RuntimeChoice("keras")
    if requested == "bf16":
        missing = bf16_missing(current_cpu())
        if missing:
            raise ModelError(f"runtime 'bf16' refused: {missing}; use --runtime auto")
    path = graph_path(folder, artifact, requested)
    sha = str(artifact.graphs[GRAPH_OF.get(requested, requested)]["sha256"])
    if requested not in GATED:
        return RuntimeChoice(requested, path, sha)
    runtime, reason = check_graph(folder, artifact, requested, path)
    reasons = [r for r in (unverified_reason(artifact.graphs[requested]), reason) if r]
    if reasons:
        logger.warning(
            "model %s: running the %s graph as asked (--runtime %s), but %s",
            folder,
            requested,
            requested,
            "; and ".join(reasons),
        )
    if runtime is None:
        runtime = open_graph(requested, path, sha, artifact.graphs[requested])
    return RuntimeChoice(requested, path, sha, loaded=runtime)


def open_graph(
    name: str, path: Path, graph_sha256: str, record: dict[str, Any] | None = None
) -> OnnxRuntime | OpenVinoRuntime:
    """The engine of runtime ``name`` on the graph at ``path``.

    ``record``: the runtime's record in ``ctcovid.json``; an OpenVINO runtime imports the
    compiled model it names where that applies (:func:`compiled_blob`) instead of compiling.
    """
    precision = {"openvino": "f32", "bf16": "bf16", "openvino-int8": "f32"}.get(name)
    # openvino-int8: the quantised ops in int8, the others in f32 (no BF16 needed).
    if precision is None:
        return OnnxRuntime(path, name, graph_sha256)
    blob = compiled_blob(path.parent, record, precision) if record else None
    if blob is not None:
        try:
            runtime = OpenVinoRuntime(path, name, graph_sha256, precision=precision, blob=blob)
        except ModelError as exc:
            logger.warning("%s; compiling the graph instead", exc)
        else:
            logger.info("%s: imported its compiled model (%d MB)", path, len(blob) // 10**6)
            return runtime
    return OpenVinoRuntime(path, name, graph_sha256, precision=precision)


def load_runtime(choice: RuntimeChoice, model: Any = None) -> Runtime:
    """Open the runtime of ``choice`` (``model`` is the Keras model for ``keras``)."""
    if choice.loaded is not None:
        return choice.loaded
    if choice.name == "keras":
        if model is None:
            raise ModelError("the keras runtime needs the Keras model")
        return KerasRuntime(model)
    assert choice.path is not None
    return open_graph(choice.name, choice.path, choice.graph_sha256)


# -- gated graphs (int8, bf16, openvino-int8): verified at export, checked at load ---------------


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64, for graphs without a logit output (infinite at 0 and 1)."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        return (np.log(p) - np.log1p(-p)).astype(np.float32)


def unverified_reason(record: dict[str, Any]) -> str:
    """Why a gated graph's record does not count as verified ('' when it does)."""
    verification = record.get("verification")
    if not isinstance(verification, dict):
        return "exported by an older ctcovid, whose gate was not confirmed on separate scans"
    if verification.get("status") == VERIFIED:
        return ""
    return str(verification.get("reason") or "its gate was not confirmed on validation scans")


def cpu_description() -> dict[str, Any]:
    """The CPU: its model name and the instruction-set flags that select int8 kernels.

    Flags come from ``/proc/cpuinfo`` (Linux), else from numpy's dispatch table (no AMX or
    AVX-VNNI there); ``source`` says which, ``"none"`` when neither could be read.
    """
    model, flags, source = platform.processor(), None, "none"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):
                flags, source = set(line.split(":", 1)[1].split()), "/proc/cpuinfo"
                break
    except OSError:  # not Linux
        pass
    if flags is None:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as features

            flags = {ours for ours, theirs in _NUMPY_FLAGS.items() if features.get(theirs)}
            source = "numpy"
        except (ImportError, AttributeError):
            flags = set()
    return {
        "model": model,
        "machine": platform.machine(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "source": source,
    }


def int8_arithmetic(cpu: dict[str, Any]) -> dict[str, Any]:
    """What sets ONNX Runtime's int8 arithmetic on a CPU: the machine, VNNI and AMX.

    Without VNNI, x86 U8S8 products go through 16-bit sums that saturate (VPMADDUBSW); with it
    they are exact; AMX runs other kernels again. A value is ``None`` where ``cpu``'s flags
    cannot tell (AMX and AVX-VNNI from numpy's table; no flags at all).
    """
    source = cpu.get("source", "/proc/cpuinfo")  # records before "source": /proc/cpuinfo
    flags = set(cpu.get("flags", []))
    known = source != "none"
    return {
        "machine": cpu.get("machine") or None,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}) if known else None,
        "amx": ("amx_int8" in flags) if source == "/proc/cpuinfo" else None,
    }


def bf16_arithmetic(cpu: dict[str, Any]) -> dict[str, Any]:
    """What sets OpenVINO's bf16 arithmetic on a CPU: AMX-BF16 tiles or AVX512-BF16 dot products
    (other kernels, other accumulation). ``None`` where ``cpu``'s flags cannot tell (only
    ``/proc/cpuinfo`` names them)."""
    flags = set(cpu.get("flags", []))
    known = cpu.get("source", "/proc/cpuinfo") == "/proc/cpuinfo"
    return {
        "machine": cpu.get("machine") or None,
        **{flag: (flag in flags) if known else None for flag in BF16_FLAGS},
    }


def bf16_missing(cpu: dict[str, Any]) -> str:
    """Why ``cpu`` cannot run bf16 ('' when it can): no BF16 instructions, or flags unknown."""
    arithmetic = bf16_arithmetic(cpu)
    if any(arithmetic[f] for f in BF16_FLAGS):
        return ""
    name = cpu.get("model") or "this CPU"
    if arithmetic[BF16_FLAGS[0]] is None:
        return (
            f"the BF16 instructions of {name} cannot be read (no /proc/cpuinfo); without them "
            "OpenVINO would compute in f32"
        )
    return (
        f"{name} has no BF16 instructions ({' or '.join(BF16_FLAGS)}); OpenVINO would compute in "
        "f32 without saying so"
    )


def openvino_int8_arithmetic(cpu: dict[str, Any]) -> dict[str, Any]:
    """What sets OpenVINO's int8 arithmetic on a CPU: its oneDNN kernels are AMX-INT8 tiles,
    else AVX512-VNNI, else AVX-VNNI, else AVX2 (saturating 16-bit sums), each with its own
    accumulation; VNNI with AVX-512 against VNNI without tells the middle two apart. ``None``
    where ``cpu``'s flags cannot tell (AMX and AVX-VNNI from numpy's table; no flags at all)."""
    source = cpu.get("source", "/proc/cpuinfo")
    flags = set(cpu.get("flags", []))
    known = source != "none"
    return {
        "machine": cpu.get("machine") or None,
        "amx_int8": ("amx_int8" in flags) if source == "/proc/cpuinfo" else None,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}) if known else None,
        "avx512f": ("avx512f" in flags) if known else None,
    }


ARITHMETIC = {
    "int8": int8_arithmetic,
    "bf16": bf16_arithmetic,
    "openvino-int8": openvino_int8_arithmetic,
}


def arithmetic_difference(
    recorded: dict[str, Any], current: dict[str, Any], runtime: str = "int8"
) -> str:
    """A phrase naming how two CPUs' arithmetic for ``runtime`` (:data:`ARITHMETIC`) differs
    ('' when it does not, or unknown)."""
    a, b = ARITHMETIC[runtime](recorded), ARITHMETIC[runtime](current)
    differ = [k for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]
    if not differ:
        return ""

    def words(x: dict[str, Any]) -> str:
        return ", ".join(
            f"{k} {x[k]}" if k == "machine" else (k.upper() if x[k] else f"no {k.upper()}")
            for k in differ
        )

    return f"its gate ran on a CPU with {words(a)}, this one has {words(b)}"


_CURRENT_CPU: dict[str, Any] = {}


def current_cpu() -> dict[str, Any]:
    """:func:`cpu_description` of this machine, read once per process."""
    if not _CURRENT_CPU:
        _CURRENT_CPU.update(cpu_description())
    return _CURRENT_CPU


def check_graph(
    folder: Path, artifact: ModelArtifact, name: str, path: Path
) -> tuple[OnnxRuntime | OpenVinoRuntime | None, str]:
    """The load check of a gated graph (:data:`GATED`): this CPU's arithmetic for it and the
    recorded check slices.

    Returns the opened graph (``None`` when the check stopped before opening it) and the reason
    it failed, ``''`` when it passed. Cheap: a few slices in one batch. A graph the engine
    cannot open raises :class:`ModelError`.
    """
    record = artifact.graphs[name]
    check = record.get("load_check")
    if name == "bf16":
        missing = bf16_missing(current_cpu())
        if missing:
            return None, missing
    if name in OPENVINO_RUNTIMES and not openvino_available():
        return None, f"OpenVINO is not installed ({OPENVINO_INSTALL_HINT})"
    if not isinstance(check, dict):
        return None, (
            f"no load check recorded for it ({CHECK_FILES[name]}; re-run 'ctcovid export')"
        )
    difference = arithmetic_difference(dict(record.get("cpu") or {}), current_cpu(), name)
    if difference:
        return None, f"{difference} ({name} arithmetic differs; re-run 'ctcovid export' here)"
    fixture = folder / str(check.get("file", CHECK_FILES[name]))
    if not fixture.is_file():
        return None, f"its check slices {fixture} are missing"
    if sha256_file(fixture) != check.get("sha256"):
        return None, f"{fixture} does not match {METADATA_FILE} (sha256 differs)"
    try:
        with np.load(fixture) as data:
            slices, recorded = data["slices"], data[f"{name}_logit"]
    except (OSError, KeyError, ValueError) as exc:
        return None, f"{fixture}: unreadable ({exc})"
    runtime = open_graph(name, path, str(record["sha256"]), record)
    _, now = runtime.predict_with_logits(slices[..., None].astype(np.float32))
    tolerance = float(check.get("logit_tolerance", CHECK_LOGIT_TOLERANCE))
    scaled = np.abs(now.astype(np.float64) - recorded) / np.maximum(1.0, np.abs(recorded))
    worst = float(np.nan_to_num(scaled, nan=np.inf).max()) if len(scaled) else 0.0
    if worst > tolerance:
        return runtime, (
            f"on this CPU its logits on the {len(slices)} check slices of {fixture.name} "
            f"differ from those measured at export by up to {worst:.3g} (limit {tolerance:g} "
            "times max(1, |logit|))"
        )
    return runtime, ""


def check_int8(folder: Path, artifact: ModelArtifact, path: Path) -> tuple[Any, str]:
    """:func:`check_graph` of the int8 graph."""
    return check_graph(folder, artifact, "int8", path)
