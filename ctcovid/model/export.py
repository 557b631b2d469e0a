"""Inference graphs for ONNX Runtime, fp32 and calibrated int8, and the gate that judges them.

The fp32 graph (``model.onnx``) is the Keras model converted by tf2onnx; it must give the Keras
probability of every checked slice within :data:`FP32_TOLERANCE`. The int8 graph
(``model.int8.onnx``) is ONNX Runtime's static quantisation of it (QDQ, per-channel int8 weights,
uint8 activations). It is kept only if, on the gate scans, every scan's int8 probability is
within :data:`INT8_TOLERANCE` of the fp32 one and every label agrees at the model's threshold;
:data:`RECIPES` are the ways to quantise, tried in order (the head and the first convolutions
kept in float, then only the convolutions quantised, then percentile and entropy calibration).
``ctcovid export`` (:mod:`ctcovid.training.export`) reads the scans and drives these steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.errors import ModelError
from ctcovid.model.runtimes import OnnxRuntime, import_onnxruntime

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # per slice, ONNX fp32 vs Keras
INT8_TOLERANCE = 0.02  # per scan, int8 vs fp32
OPSET = 17
DEFAULT_CALIBRATION_SLICES = 32
FP32_CHECK_SLICES = 16


@dataclass(frozen=True)
class Recipe:
    """One way to quantise: calibration method and which nodes stay in float."""

    name: str
    method: str  # MinMax | Percentile | Entropy
    keep_ends_float: bool  # the first convolution of each branch and the head stay fp32
    percentile: float = 99.999
    # Operator types quantised; None: every type ONNX Runtime can quantise (Add, Concat,
    # pooling, the pre-activation BatchNorm of DenseNet's blocks...). The convolutions carry
    # nearly all the arithmetic, so quantising only them keeps most of the speed.
    op_types: tuple[str, ...] | None = None


RECIPES = (
    Recipe("minmax", "MinMax", keep_ends_float=False),
    Recipe("minmax, ends in fp32", "MinMax", keep_ends_float=True),
    Recipe(
        "minmax, convolutions only, ends in fp32",
        "MinMax",
        keep_ends_float=True,
        op_types=("Conv", "MatMul", "Gemm"),
    ),
    Recipe("percentile 99.999, ends in fp32", "Percentile", keep_ends_float=True),
    Recipe("entropy, ends in fp32", "Entropy", keep_ends_float=True),
)


@dataclass
class ScanSlices:
    """One scan as inference sees it (after the slice policy)."""

    scan_id: str
    slices: np.ndarray  # (N, S, S) uint8


@dataclass
class GateResult:
    """int8 against fp32 on the gate scans."""

    recipe: str
    passed: bool
    max_probability_difference: float
    label_flips: list[str]
    scans: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, max_named: int = 5) -> str:
        """One line; names at most ``max_named`` flipped scans (all are in ``label_flips``)."""
        flips = ""
        if self.label_flips:
            named = ", ".join(self.label_flips[:max_named])
            more = len(self.label_flips) - max_named
            flips = f", {len(self.label_flips)} label(s) flipped: {named}" + (
                f" and {more} more" if more > 0 else ""
            )
        return (
            f"{self.recipe}: max |int8 - fp32| = {self.max_probability_difference:.4f} "
            f"(limit {INT8_TOLERANCE}){flips}"
        )


# -- scans -----------------------------------------------------------------------------------------


def sample_slices(scans: Sequence[ScanSlices], n: int) -> np.ndarray:
    """``n`` slices spread evenly over all scans (all of them when there are fewer)."""
    every = np.concatenate([s.slices for s in scans])
    if len(every) <= n:
        return every
    return every[np.unique(np.linspace(0, len(every) - 1, n).round().astype(int))]


# -- fp32 -----------------------------------------------------------------------------------------


def convert_to_onnx(model: Any, out: Path, input_size: int) -> None:
    """The Keras model's inference function as an ONNX graph (tf2onnx, opset 17).

    tf2onnx deep-copies the whole graph before each of its optimisers when it catches their
    errors; with its documented switch off the conversion of this ~1000-layer network takes a
    third of the time, and an optimiser failure fails the export instead of being skipped.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ModelError(
            f"export needs the TensorFlow backend (KERAS_BACKEND={keras.backend.backend()})"
        )
    try:
        import tensorflow as tf
        import tf2onnx
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError as exc:
        raise ModelError(
            f"export needs tf2onnx and onnx ({exc}); pip install 'ctcovid[onnx]'"
        ) from exc
    with warnings.catch_warnings():
        # Keras' patch probes numpy for the removed alias np.object, which warns on numpy 2.
        warnings.simplefilter("ignore", FutureWarning)
        patch_tf2onnx()  # tf2onnx still refers to numpy aliases removed in numpy 2
    spec = (tf.TensorSpec((None, input_size, input_size, 1), tf.float32, name="slice"),)
    function = tf.function(lambda x: model(x, training=False), input_signature=spec)
    previous = os.environ.get("TF2ONNX_CATCH_ERRORS")
    os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
    try:
        tf2onnx.convert.from_function(function, spec, opset=OPSET, output_path=str(out))
    finally:
        if previous is None:
            os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
        else:
            os.environ["TF2ONNX_CATCH_ERRORS"] = previous
    import onnx

    inputs = [i.name for i in onnx.load(str(out), load_external_data=False).graph.input]
    if len(inputs) != 1:
        # tf2onnx leaves a variable it could not freeze as a graph input (seen with the
        # Normalization layer inside EfficientNet): such a graph cannot run on slices alone.
        raise ModelError(
            f"the ONNX graph of this model has inputs {inputs} besides the slice; its layers "
            "cannot all be exported (the ResNet and DenseNet backbones can)"
        )


def keras_probabilities(model: Any, slices: np.ndarray, batch_size: int = 32) -> np.ndarray:
    out = [
        np.asarray(model.predict_on_batch(slices[i : i + batch_size, ..., None].astype(np.float32)))
        for i in range(0, len(slices), batch_size)
    ]
    return np.concatenate(out).reshape(-1).astype(np.float32)


def runtime_probabilities(
    runtime: OnnxRuntime, slices: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    out = [
        runtime.predict(slices[i : i + batch_size, ..., None].astype(np.float32))
        for i in range(0, len(slices), batch_size)
    ]
    return np.concatenate(out) if out else np.empty(0, np.float32)


# -- int8 -----------------------------------------------------------------------------------------


def float_ends(model_path: Path) -> list[str]:
    """Names of the nodes to keep in float: each branch's first Conv and the head.

    The first convolution sees the raw image scale, and the head (everything after the last
    convolution: fusion, pooling, Dense, sigmoid) sets the probability directly; both are the
    usual first suspects when int8 moves a network's output.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    after_conv: dict[str, bool] = {i.name: False for i in graph.input}
    first: list[str] = []
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:  # ONNX graphs are stored in topological order
        seen = any(after_conv.get(t, False) for t in node.input)
        if node.op_type == "Conv" and not seen:
            first.append(node.name)
        for t in node.output:
            after_conv[t] = seen or node.op_type == "Conv"
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    # Nodes from which no Conv can be reached, found backwards from the outputs.
    leads_to_conv: dict[str, bool] = {}
    for node in reversed(graph.node):
        reach = node.op_type == "Conv" or any(
            leads_to_conv.get(c.name, False) for t in node.output for c in consumers.get(t, [])
        )
        leads_to_conv[node.name] = reach
    head = [n.name for n in graph.node if not leads_to_conv[n.name]]
    return first + head


class _Reader:
    """ONNX Runtime's CalibrationDataReader over uint8 slices, in batches of ``batch_size``.

    ``__len__`` and ``set_range`` (in batches) let the calibrator take one batch at a time.
    """

    def __init__(self, input_name: str, slices: np.ndarray, batch_size: int = 8):
        self.input_name = input_name
        self.slices = slices
        self.batch_size = batch_size
        self._it: Iterator[int] = iter(range(len(self)))

    def __len__(self) -> int:
        return -(-len(self.slices) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(range(start_index, min(end_index, len(self))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        if i is None:
            return None
        chunk = self.slices[i * self.batch_size : (i + 1) * self.batch_size]
        return {self.input_name: chunk[..., None].astype(np.float32)}


def quantize(fp32_path: Path, out: Path, calibration: np.ndarray, recipe: Recipe) -> None:
    """Static int8 quantisation of ``fp32_path`` into ``out`` following ``recipe``."""
    import_onnxruntime("int8")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime recommends for quantisation.
        # ONNX shape inference suffices: only the batch dimension is symbolic.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        import onnx

        input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        # Calibrators keep every activation of every slice they are fed at once (about 0.4 GB
        # a slice for the full model at 256 px); fed one batch at a time ("strided") they merge
        # ranges and histograms as they go, so memory stays that of one batch.
        extra: dict[str, Any] = {"CalibStridedMinMax": 1}
        if recipe.method == "Percentile":
            extra["CalibPercentile"] = recipe.percentile
        # The calibrators print their progress with print(); it goes to the debug log instead.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            quantize_static(
                str(pre),
                str(out),
                _Reader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, recipe.method),
                nodes_to_exclude=float_ends(pre) if recipe.keep_ends_float else [],
                extra_options=extra,
                op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None,
            )
        if printed.getvalue().strip():
            logger.debug("quantizer: %s", " | ".join(printed.getvalue().split("\n")))


def gate(
    recipe: Recipe,
    scans: Sequence[ScanSlices],
    fp32: dict[str, float],
    int8: OnnxRuntime,
    threshold: float,
) -> GateResult:
    """Scan probabilities (mean of slices) of int8 against the fp32 ones (by scan id)."""
    rows = []
    for scan in scans:
        p8 = float(np.mean(runtime_probabilities(int8, scan.slices)))
        rows.append(
            {
                "scan": scan.scan_id,
                "fp32": fp32[scan.scan_id],
                "int8": p8,
                "n_slices": len(scan.slices),
            }
        )
    return judge(recipe.name, rows, threshold)


def judge(recipe: str, rows: list[dict[str, Any]], threshold: float) -> GateResult:
    """The accuracy gate on measured scan probabilities: |int8 - fp32| and labels."""
    worst = max((abs(r["int8"] - r["fp32"]) for r in rows), default=0.0)
    flips = [r["scan"] for r in rows if (r["int8"] >= threshold) != (r["fp32"] >= threshold)]
    passed = bool(rows) and worst <= INT8_TOLERANCE and not flips
    return GateResult(recipe, passed, round(worst, 6), flips, rows)


# -- the record --------------------------------------------------------------------------


def cpu_description() -> dict[str, Any]:
    """The CPU the gate was measured on: int8 kernels differ between instruction sets."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # no /proc/cpuinfo (not Linux): platform.processor() and no flags
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": model, "flags": [f for f in wanted if f in flags]}


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def package_versions(*packages: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for p in packages:
        try:
            parts.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)
