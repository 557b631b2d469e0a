"""How a model folder is run: Keras, or an exported graph on ONNX Runtime (fp32 or int8).

The runtime is a detail behind ``Classifier.predict_slices``: each one maps a float32 batch of
slices (N, S, S, 1) in [0, 255] to P(COVID) per slice. Keras is the reference (and the training
engine); ``ctcovid export`` adds graphs to the folder, recorded in ``ctcovid.json`` with their
sha256 and the weights they came from.

``auto`` picks, among the runtimes whose graph the folder holds, the first of :data:`AUTO_ORDER`:
``int8``, then ``onnx`` (fp32), then ``keras``. Without ONNX Runtime installed ``auto`` falls back
to Keras and says so in the log. ``auto`` takes the int8 graph only when it is ``verified`` (its
gate was confirmed on validation scans disjoint from the calibration scans) and it passes the
load check (:func:`check_int8`): the CPU's int8 arithmetic (VNNI, AMX) is the one the gate ran on,
and the graph reproduces the logits recorded for a few slices (``model.int8.check.npz``). Else it
takes the fp32 graph and logs one warning naming the reason. An explicit ``int8`` runs the graph
in any case, with one warning when it is unverified or fails the load check.

Threads are pinned (:func:`scoring_threads`): a runtime that splits a reduction among another
number of threads may sum in another order, and the last bits of a probability would follow the
load of the machine or a setting instead of the slice.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
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
#: A few slices with the fp32 and int8 logits the gate measured: the int8 load check.
CHECK_FILE = "model.int8.check.npz"
#: |int8 logit now - int8 logit at export| allowed on the check slices, times max(1, |logit|):
#: the same kernels give the same logits to rounding; other kernels (VNNI against AVX2's
#: saturating U8S8 products) give other ones.
CHECK_LOGIT_TOLERANCE = 0.05
VERIFIED = "verified"
UNVERIFIED = "unverified"
#: The CPU flags that select ONNX Runtime's int8 kernels, and so the int8 arithmetic.
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
_NUMPY_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512VNNI",
}
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
    """Which runtime ``requested`` means for this model folder (graphs verified).

    For ``int8`` (asked, or the first choice of ``auto``) the graph is opened and checked on a few
    slices (:func:`check_int8`); the session comes back in the choice for :func:`load_runtime`.
    """
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
        if present[0] == "int8":
            path = graph_path(folder, artifact, "int8")
            reason = unverified_reason(artifact.graphs["int8"])
            if reason:
                logger.info(
                    "model %s: the int8 graph is %s (%s); auto uses %s",
                    folder,
                    UNVERIFIED,
                    reason,
                    present[1],
                )
            else:
                runtime, reason = check_int8(folder, artifact, path)
                if not reason and runtime is not None:
                    return RuntimeChoice("int8", path, runtime.graph_sha256, loaded=runtime)
                logger.warning(
                    "model %s: int8 graph not used, %s; auto falls back to %s",
                    folder,
                    reason,
                    present[1]
                    if present[1] == "keras"
                    else f"the fp32 graph {GRAPH_FILES[present[1]]}",
                )
            present = present[1:]
        requested = present[0]
    if requested == "keras":
        return RuntimeChoice("keras")
    path = graph_path(folder, artifact, requested)
    sha = str(artifact.graphs[requested]["sha256"])
    if requested != "int8":
        return RuntimeChoice(requested, path, sha)
    runtime, reason = check_int8(folder, artifact, path)
    reasons = [r for r in (unverified_reason(artifact.graphs["int8"]), reason) if r]
    if reasons:
        logger.warning(
            "model %s: running the int8 graph as asked (--runtime int8), but %s",
            folder,
            "; and ".join(reasons),
        )
    return RuntimeChoice("int8", path, sha, loaded=runtime)


def load_runtime(choice: RuntimeChoice, model: Any = None) -> Runtime:
    """Open the runtime of ``choice`` (``model`` is the Keras model for ``keras``)."""
    if choice.loaded is not None:
        return choice.loaded
    if choice.name == "keras":
        if model is None:
            raise ModelError("the keras runtime needs the Keras model")
        return KerasRuntime(model)
    assert choice.path is not None
    return OnnxRuntime(choice.path, choice.name, choice.graph_sha256)


# -- the int8 graph: verified at export, checked at load ------------------------------------------


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64, for graphs without a logit output (infinite at 0 and 1)."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        return (np.log(p) - np.log1p(-p)).astype(np.float32)


def unverified_reason(record: dict[str, Any]) -> str:
    """Why an int8 graph's record does not count as verified ('' when it does)."""
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


def arithmetic_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """A phrase naming how two CPUs' int8 arithmetic differs ('' when it does not, or unknown)."""
    a, b = int8_arithmetic(recorded), int8_arithmetic(current)
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


def check_int8(folder: Path, artifact: ModelArtifact, path: Path) -> tuple[OnnxRuntime | None, str]:
    """The int8 load check: this CPU's int8 arithmetic and the recorded check slices.

    Returns the opened graph (``None`` when the check stopped before opening it) and the reason
    it failed, ``''`` when it passed. Cheap: a few slices in one batch. A graph ONNX Runtime
    cannot open raises :class:`ModelError`.
    """
    record = artifact.graphs["int8"]
    check = record.get("load_check")
    if not isinstance(check, dict):
        return None, f"no load check recorded for it ({CHECK_FILE}; re-run 'ctcovid export')"
    difference = arithmetic_difference(dict(record.get("cpu") or {}), current_cpu())
    if difference:
        return None, f"{difference} (int8 arithmetic differs; re-run 'ctcovid export' here)"
    fixture = folder / str(check.get("file", CHECK_FILE))
    if not fixture.is_file():
        return None, f"its check slices {fixture} are missing"
    if sha256_file(fixture) != check.get("sha256"):
        return None, f"{fixture} does not match {METADATA_FILE} (sha256 differs)"
    try:
        with np.load(fixture) as data:
            slices, recorded = data["slices"], data["int8_logit"]
    except (OSError, KeyError, ValueError) as exc:
        return None, f"{fixture}: unreadable ({exc})"
    runtime = OnnxRuntime(path, "int8", str(record["sha256"]))
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
