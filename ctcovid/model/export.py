"""Inference graphs for ONNX Runtime, fp32 and calibrated int8, and the gate that judges them.

The fp32 graph (``model.onnx``) is the Keras model converted by tf2onnx, with the logit (the
sigmoid's input) added as a second output; on every checked slice its logit must match Keras'
within :data:`FP32_LOGIT_TOLERANCE` (times max(1, |logit|)) and its probability within
:data:`FP32_TOLERANCE`. The int8 graph (``model.int8.onnx``) is ONNX Runtime's static
quantisation of it (QDQ, per-channel int8 weights, uint8 or int8 activations).

The int8 gate (:func:`judge`) compares int8 with fp32 on whole scans: every scan's probability
(mean of its slices) within :data:`INT8_TOLERANCE`, every slice's within
:data:`INT8_SLICE_TOLERANCE` and its logit within :data:`INT8_LOGIT_TOLERANCE`, and no label
flipped at the model's threshold. It is used twice, on different scans: :data:`RECIPES` are tried
in order on the calibration scans and the first that passes is *selected*; that one recipe is
then *confirmed* once on validation scans disjoint from them. Confirmation needs enough scans to
state a bound (:class:`GateRequirements`: scans, both fp32 labels, scans near the threshold), and
reports the exact one-sided 95% upper bound on the label flip rate (:func:`flip_rate_upper_bound`).
``ctcovid export`` (:mod:`ctcovid.training.export`) reads the scans and drives these steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import hashlib
import io
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.errors import ModelError
from ctcovid.model.runtimes import (
    CAM_OUTPUT,
    CHECK_LOGIT_TOLERANCE,
    OnnxRuntime,
    OpenVinoRuntime,
    import_onnxruntime,
    int8_arithmetic,
)
from ctcovid.model.runtimes import cpu_description as cpu_description  # re-exported (bench)

logger = logging.getLogger(__name__)

#: An exported graph on its engine: what the gate scores.
GraphRuntime = OnnxRuntime | OpenVinoRuntime

FP32_TOLERANCE = 1e-4  # per slice probability, ONNX fp32 vs Keras
FP32_LOGIT_TOLERANCE = 1e-3  # per slice logit, ONNX fp32 vs Keras, times max(1, |logit|)
INT8_TOLERANCE = 0.02  # per scan probability (mean of its slices), int8 vs fp32
INT8_SLICE_TOLERANCE = 0.1  # per slice probability, int8 vs fp32
INT8_LOGIT_TOLERANCE = 1.0  # per slice logit, int8 vs fp32 (a saturated sigmoid hides these)
OPSET = 17
DEFAULT_CALIBRATION_SLICES = 32
FP32_CHECK_SLICES = 16
CHECK_SLICES = 4  # slices of the int8 load check (model.int8.check.npz)
CONFIDENCE = 0.95  # of the upper bound on the label flip rate


@dataclass(frozen=True)
class GateRequirements:
    """What the confirmation scans must hold before the int8 gate can state a bound.

    Classes and nearness are counted on the fp32 scan probabilities (what int8 could flip).
    """

    min_scans: int = 100
    min_per_class: int = 10  # scans on each side of the threshold
    min_near_threshold: int = 10  # scans whose fp32 probability is within ``near`` of it
    near: float = 0.1

    def counts(self, fp32: Sequence[float], threshold: float) -> dict[str, int]:
        """Scans, positives, negatives and near-threshold scans among fp32 probabilities."""
        positives = sum(p >= threshold for p in fp32)
        return {
            "n_scans": len(fp32),
            "n_positive": positives,
            "n_negative": len(fp32) - positives,
            "n_near_threshold": sum(abs(p - threshold) <= self.near for p in fp32),
        }

    def shortfall(self, counts: dict[str, int], threshold: float) -> list[str]:
        """One phrase per requirement ``counts`` misses: how many it has and needs."""
        missing = []
        if counts["n_scans"] < self.min_scans:
            missing.append(f"{counts['n_scans']} scan(s), needs {self.min_scans}")
        for side, key in (("at or above", "n_positive"), ("below", "n_negative")):
            if counts[key] < self.min_per_class:
                missing.append(
                    f"{counts[key]} scan(s) {side} the threshold {threshold:g} by fp32, "
                    f"needs {self.min_per_class}"
                )
        if counts["n_near_threshold"] < self.min_near_threshold:
            missing.append(
                f"{counts['n_near_threshold']} scan(s) within {self.near:g} of the threshold by "
                f"fp32, needs {self.min_near_threshold}"
            )
        return missing


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
    activations: str = "uint8"  # uint8 (U8S8) | int8 (S8S8); weights are always int8
    # 7-bit weights. None: on where the exporting CPU has no VNNI, as ONNX Runtime's
    # quantisation guide advises for U8S8 there (its 16-bit intermediate sums may saturate).
    reduce_range: bool | None = None

    def resolved(self, cpu: dict[str, Any]) -> Recipe:
        """This recipe with ``reduce_range`` decided for ``cpu`` (:func:`cpu_description`)."""
        if self.reduce_range is not None:
            return self
        vnni = int8_arithmetic(cpu)["vnni"]
        machine = str(cpu.get("machine") or "").lower()
        x86 = machine in ("x86_64", "amd64", "i386", "i686", "x86")
        return replace(self, reduce_range=bool(x86 and self.activations == "uint8" and not vnni))

    def describe(self) -> dict[str, Any]:
        """The recipe as ``ctcovid.json`` records it."""
        return {
            "name": self.name,
            "method": self.method,
            "format": "QDQ",
            "weights": "int8 per channel" + (" (7-bit range)" if self.reduce_range else ""),
            "activations": self.activations,
            "reduce_range": bool(self.reduce_range),
            "op_types": list(self.op_types) if self.op_types else "all",
            "ends_in_fp32": self.keep_ends_float,
        }


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
    # S8S8: int8 activations, ONNX Runtime's default for QDQ.
    Recipe(
        "minmax, S8S8, convolutions only, ends in fp32",
        "MinMax",
        keep_ends_float=True,
        op_types=("Conv", "MatMul", "Gemm"),
        activations="int8",
    ),
)


@dataclass
class ScanSlices:
    """One scan as inference sees it (after the slice policy), and what identifies it."""

    scan_id: str
    slices: np.ndarray  # (N, S, S) uint8
    files: tuple[str, ...] = ()  # resolved input file paths
    series_instance_uid: str = ""  # DICOM only

    def identities(self) -> dict[str, str]:
        """Keys shared by two copies of one scan: input files, SeriesInstanceUID, pixels."""
        keys = {f"file {f}": f"file {f}" for f in self.files}
        if self.series_instance_uid:
            keys[f"series {self.series_instance_uid}"] = (
                f"SeriesInstanceUID {self.series_instance_uid}"
            )
        digest = hashlib.sha256(np.ascontiguousarray(self.slices).tobytes()).hexdigest()
        keys[f"pixels {digest}"] = "slice pixels"
        return keys


@dataclass
class Scored:
    """fp32 or int8 outputs of one scan: per slice probability and logit."""

    p: np.ndarray
    z: np.ndarray

    @property
    def scan_probability(self) -> float:
        return float(np.mean(self.p)) if len(self.p) else float("nan")


@dataclass
class GateResult:
    """A gated graph (int8, bf16) against fp32 on one set of scans (selection or confirmation).

    Each row of ``scans`` holds the scan's fp32 probability under ``fp32`` and the gated graph's
    under its runtime's name (``candidate``)."""

    recipe: str
    passed: bool
    max_probability_difference: float  # scan level
    label_flips: list[str]
    scans: list[dict[str, Any]] = field(default_factory=list)
    max_slice_probability_difference: float = 0.0
    max_slice_logit_difference: float = 0.0
    n_slices: int = 0
    candidate: str = "int8"

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
            f"{self.recipe}: max |{self.candidate} - fp32| = "
            f"{self.max_probability_difference:.4f} per scan "
            f"(limit {INT8_TOLERANCE}), {self.max_slice_probability_difference:.4f} per slice "
            f"(limit {INT8_SLICE_TOLERANCE}), logit {self.max_slice_logit_difference:.3f} per "
            f"slice (limit {INT8_LOGIT_TOLERANCE}) on {len(self.scans)} scan(s){flips}"
        )


# -- scans -----------------------------------------------------------------------------------------


def sample_slices(scans: Sequence[ScanSlices], n: int) -> np.ndarray:
    """``n`` slices spread evenly over all scans (all of them when there are fewer)."""
    every = np.concatenate([s.slices for s in scans])
    if len(every) <= n:
        return every
    return every[np.unique(np.linspace(0, len(every) - 1, n).round().astype(int))]


def overlap(first: Sequence[ScanSlices], second: Sequence[ScanSlices]) -> list[str]:
    """Scans of ``second`` that are also in ``first``: the same input file, the same DICOM
    SeriesInstanceUID, or identical slices (a copy). One phrase per such scan."""
    seen: dict[str, str] = {}
    for scan in first:
        for key in scan.identities():
            seen.setdefault(key, scan.scan_id)
    found = []
    for scan in second:
        for key, why in scan.identities().items():
            if key in seen:
                found.append(f"{scan.scan_id} (same {why} as {seen[key]})")
                break
    return found


# -- fp32 -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fresh_node_protos() -> Iterator[None]:
    """While converting, tf2onnx rebuilds each node's protobuf in a new message.

    After every optimiser tf2onnx writes each node's attributes back into its ``NodeProto``:
    it deletes them and appends them again. Under protobuf's upb backend (the default since
    protobuf 4) a message's memory lives in an arena that deleting a field does not shrink, so
    every Const node kept one more copy of its tensor per pass: twelve optimisers, twice, put 24
    copies of the weights on top, 4.7 GB for the 256 px Res-Dense Net (200 MB of weights), freed
    only with the graph. Here each pass writes into a new message that holds the node's other
    fields (name, type, inputs, outputs) and, once tf2onnx has appended them, its attributes; the
    previous message goes. Only where the bytes live changes: the nodes hold what tf2onnx wrote,
    and the graph is the same (tests/test_runtimes.py compares it with tf2onnx's own).
    """
    from tf2onnx.graph import Node

    original = Node.update_proto

    def update_proto(self: Any, external_tensor_storage: Any = None) -> None:
        old = self._op
        old.ClearField("attribute")  # update_proto writes them all again
        fresh = type(old)()
        fresh.CopyFrom(old)
        self._op = fresh
        original(self, external_tensor_storage)

    Node.update_proto = update_proto
    try:
        yield
    finally:
        Node.update_proto = original


def _from_function(function: Any, spec: tuple[Any, ...], out: Path) -> None:
    """tf2onnx's ``convert.from_function`` (1.17), step for step, without its frozen function
    resident through TensorFlow's grappler pass.

    tf2onnx freezes the variables into constants (a new function holding a copy of every
    weight), takes that function's GraphDef, and keeps the function until the grappler pass
    and its own conversion have run. Here it goes as soon as its GraphDef is taken: measured on
    the 256 px Res-Dense Net, 0.6 GB, and the conversion's peak fell from 5.3 to 4.2 GB. The
    GraphDef, the graph that grappler optimises in and every option are tf2onnx's own, so the
    ONNX graph is too (tests/test_runtimes.py compares them). Where tf2onnx would repair a
    freezing error, or lacks the steps this follows, tf2onnx converts as it would alone.
    """
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )
    from tf2onnx import tf_loader

    convert = tf2onnx.convert
    steps = ("_convert_common", "tensor_names_from_structed")
    if not all(hasattr(convert, f) for f in steps) or not hasattr(tf_loader, "tf_optimize"):
        convert.from_function(function, spec, opset=OPSET, output_path=str(out))
        return
    concrete = function.get_concrete_function(*spec)
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.dtypes.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    renamed = convert.tensor_names_from_structed(concrete, inputs, outputs)
    with tf.device("/cpu:0"):
        try:
            frozen = convert_variables_to_constants_v2(
                concrete, lower_control_flow=False, aggressive_inlining=True
            )
        except ValueError as exc:
            if "incompatible with expected resource" not in str(exc):
                raise
            convert.from_function(function, spec, opset=OPSET, output_path=str(out))
            return
        graph_def = frozen.graph.as_graph_def(add_shapes=True)
        del frozen
        gc.collect()  # the function and its graph are reference cycles
        graph_def = tf_loader.fix_freezing_errors_part2(graph_def)
        with tf.Graph().as_default() as tf_graph, tf_loader.tf_session(graph=tf_graph) as sess:
            tf.import_graph_def(graph_def, name="")
            inputs = tf_loader.inputs_without_resource(sess, inputs)
            graph_def = tf_loader.tf_optimize(inputs, outputs, graph_def)
        common = dict(
            name=concrete.name,
            continue_on_error=True,
            target=None,
            opset=OPSET,
            custom_ops=None,
            custom_op_handlers=None,
            custom_rewriter=None,
            extra_opset=None,
            shape_override=None,
            input_names=inputs,
            output_names=outputs,
            inputs_as_nchw=None,
            outputs_as_nchw=None,
            large_model=False,
            tensors_to_rename=renamed,
            initialized_tables=None,
            output_path=str(out),
        )
        try:
            convert._convert_common(graph_def, **common)
            return
        except TypeError as exc:  # another tf2onnx whose private step takes other arguments
            logger.info("tf2onnx's conversion steps differ (%s): converting as tf2onnx does", exc)
            del graph_def
    convert.from_function(function, spec, opset=OPSET, output_path=str(out))


def convert_to_onnx(model: Any, out: Path, input_size: int, *, bounded: bool = True) -> None:
    """The Keras model's inference function as an ONNX graph (tf2onnx, opset 17).

    tf2onnx deep-copies the whole graph before each of its optimisers when it catches their
    errors; with its documented switch off the conversion of this ~1000-layer network takes a
    third of the time, and an optimiser failure fails the export instead of being skipped.
    ``bounded`` (the default) keeps tf2onnx's optimisers from piling up copies of the weights
    (:func:`_fresh_node_protos`) and lets the frozen function go before grappler runs
    (:func:`_from_function`): measured on the 256 px Res-Dense Net, the conversion's peak
    resident set fell from 9.1 to 4.2 GB, the same graph written. ``bounded=False`` converts as
    tf2onnx alone does.
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
        if bounded:
            with _fresh_node_protos():
                _from_function(function, spec, out)
        else:
            tf2onnx.convert.from_function(function, spec, opset=OPSET, output_path=str(out))
    finally:
        if previous is None:
            os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
        else:
            os.environ["TF2ONNX_CATCH_ERRORS"] = previous
        # The conversion's frozen TensorFlow graphs and tf2onnx's graph are reference cycles that
        # outlive it until a full collection: 1.6 of the 3.1 GB resident after converting the
        # 256 px Res-Dense Net (7.2 of 8.4 GB unbounded), under the Keras check and the int8
        # calibration that follow.
        del function
        gc.collect()
    import onnx

    inputs = [i.name for i in onnx.load(str(out), load_external_data=False).graph.input]
    if len(inputs) != 1:
        # tf2onnx leaves a variable it could not freeze as a graph input (seen with the
        # Normalization layer inside EfficientNet): such a graph cannot run on slices alone.
        raise ModelError(
            f"the ONNX graph of this model has inputs {inputs} besides the slice; its layers "
            "cannot all be exported (the ResNet and DenseNet backbones can)"
        )


def add_logit_output(path: Path) -> str:
    """Add the sigmoid's input (the logit) to the graph in ``path`` as its second output.

    Returns the logit tensor's name. The probability stays the first output, which is all that
    inference reads; the gate compares logits, which a saturated sigmoid does not flatten.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    output = graph.output[0].name
    producer = next((n for n in graph.node if output in n.output), None)
    if producer is None or producer.op_type != "Sigmoid":
        raise ModelError(
            f"{path}: the graph's output {output!r} is not a Sigmoid's "
            f"({producer.op_type if producer else 'no node'}); cannot find the logit"
        )
    name = producer.input[0]
    if name not in [o.name for o in graph.output]:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        onnx.save(model, str(path))
    return name


def add_cam_output(path: Path) -> str:
    """Add the class-activation map to the graph in ``path`` as an output named ``cam``.

    The head is GlobalAveragePool -> (Squeeze | Flatten | Reshape) -> MatMul (the Dense kernel):
    the map is the pooled feature map, channels last, times that kernel (Zhou et al., 2016), as
    ``Classifier.class_activation_maps`` computes it from the Keras model. With it a heatmap
    needs neither Keras nor TensorFlow. Returns the feature map's tensor name.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    if CAM_OUTPUT in [o.name for o in graph.output]:
        return CAM_OUTPUT
    producer = {t: n for n in graph.node for t in n.output}
    sigmoid = producer.get(graph.output[0].name)
    node = producer.get(sigmoid.input[0]) if sigmoid is not None else None
    if node is not None and node.op_type == "Add":  # a bias after the MatMul
        node = next(
            (producer[t] for t in node.input if t in producer and producer[t].op_type == "MatMul"),
            None,
        )
    if node is None or node.op_type != "MatMul":
        raise ModelError(f"{path}: cannot find the head's Dense (MatMul) before the sigmoid")
    kernel = node.input[1]
    pooled = producer.get(node.input[0])
    while pooled is not None and pooled.op_type in ("Squeeze", "Flatten", "Reshape"):
        pooled = producer.get(pooled.input[0])
    if pooled is None or pooled.op_type != "GlobalAveragePool":
        raise ModelError(f"{path}: the head's Dense does not follow a global average pooling")
    features = pooled.input[0]  # NCHW, as ONNX pools
    graph.node.extend(
        [
            helper.make_node(
                "Transpose", [features], ["cam_nhwc"], perm=[0, 2, 3, 1], name="cam_nhwc"
            ),
            helper.make_node("MatMul", ["cam_nhwc", kernel], [CAM_OUTPUT], name="cam"),
        ]
    )
    graph.output.append(
        onnx.helper.make_tensor_value_info(CAM_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    onnx.save(model, str(path))
    return features


def keras_outputs(model: Any, slices: np.ndarray, batch_size: int = 32) -> Scored:
    """Keras probabilities and logits (the head's Dense before its sigmoid) per slice."""
    import keras

    head = model.get_layer("p_covid")
    features = keras.Model(model.inputs, head.input)
    kernel = np.asarray(head.kernel, np.float64)
    bias = np.asarray(head.bias, np.float64) if head.use_bias else np.zeros(1)
    p, z = [], []
    for i in range(0, len(slices), batch_size):
        x = slices[i : i + batch_size, ..., None].astype(np.float32)
        p.append(np.asarray(model.predict_on_batch(x)).reshape(-1))
        f = np.asarray(features.predict_on_batch(x), np.float64)
        z.append((f @ kernel + bias).reshape(-1))
    if not p:
        return Scored(np.empty(0, np.float32), np.empty(0, np.float32))
    return Scored(np.concatenate(p).astype(np.float32), np.concatenate(z).astype(np.float32))


def runtime_probabilities(
    runtime: GraphRuntime, slices: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    out = [
        runtime.predict(slices[i : i + batch_size, ..., None].astype(np.float32))
        for i in range(0, len(slices), batch_size)
    ]
    return np.concatenate(out) if out else np.empty(0, np.float32)


def runtime_outputs(runtime: GraphRuntime, slices: np.ndarray, batch_size: int = 32) -> Scored:
    """Probabilities and logits of ``runtime`` per slice."""
    p, z = [], []
    for i in range(0, len(slices), batch_size):
        pi, zi = runtime.predict_with_logits(
            slices[i : i + batch_size, ..., None].astype(np.float32)
        )
        p.append(pi)
        z.append(zi)
    if not p:
        return Scored(np.empty(0, np.float32), np.empty(0, np.float32))
    return Scored(np.concatenate(p), np.concatenate(z))


def fp32_difference(reference: Scored, graph: Scored) -> dict[str, float]:
    """The fp32 graph against Keras: largest probability and scaled logit differences."""
    dp = np.abs(reference.p.astype(np.float64) - graph.p)
    dz = np.abs(reference.z.astype(np.float64) - graph.z) / np.maximum(1.0, np.abs(reference.z))
    return {
        "max_slice_difference_vs_keras": float(dp.max()) if len(dp) else 0.0,
        "max_slice_logit_difference_vs_keras": float(dz.max()) if len(dz) else 0.0,
    }


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


CALIBRATION_BATCH = 8  # slices per calibration run, and the unit the calibrators merge


class _Reader:
    """ONNX Runtime's CalibrationDataReader over uint8 slices, in batches of ``batch_size``.

    ``__len__`` and ``set_range`` (in batches) let the calibrator take one batch at a time.
    """

    def __init__(self, input_name: str, slices: np.ndarray, batch_size: int = CALIBRATION_BATCH):
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


def _lean_session(calibrator: Any) -> None:
    """Give ``calibrator`` a session on its augmented graph without ONNX Runtime's memory arena
    and memory pattern; otherwise the session the calibrator built.

    Measured on the 256 px Res-Dense Net, one batch of 8 slices through the augmented graph:
    7.4 GB peak with both (the arena keeps the first run's blocks while the memory pattern of
    the second run allocates its own), 3.7 GB without, the live activations themselves. Only
    memory is planned differently: the graph, its optimisation level (none, as the calibrator
    asks) and its threads are the calibrator's own, so every activation, and every range, is
    the same to the bit.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    calibrator.infer_session = None  # free the calibrator's own session first
    calibrator.infer_session = ort.InferenceSession(
        calibrator.augmented_model_path,
        sess_options=options,
        providers=calibrator.execution_providers,
    )


def quantize(
    fp32_path: Path, out: Path, calibration: np.ndarray, recipe: Recipe, *, bounded: bool = True
) -> None:
    """Static int8 quantisation of ``fp32_path`` into ``out`` following ``recipe``.

    The calibration runs :data:`CALIBRATION_BATCH` slices at a time and merges each batch's
    ranges (MinMax) or histograms (Percentile, Entropy) before the next. The batch is what fixes
    the ranges: ONNX Runtime's convolutions are not bit-identical across batch sizes (the 256 px
    Res-Dense Net's DenseNet ranges moved by an ulp between batches of 1 and 8), and a histogram
    calibrator's bins follow the first batch it sees. So memory is bounded without touching the
    batch: ``bounded`` (the default) runs the calibration here, on a session without memory
    arena (:func:`_lean_session`), frees the calibrator and its session before the quantiser
    builds the graph, and hands the ranges to ``quantize_static`` through its calibration cache;
    ``bounded=False`` lets ``quantize_static`` calibrate on its own session, as before. Both write
    the same bytes (tests/test_runtimes.py checks).
    """
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
        method = getattr(CalibrationMethod, recipe.method)
        op_types = list(recipe.op_types) if recipe.op_types else None
        reader = _Reader(input_name, calibration)
        cache = None
        # The calibrators print their progress with print(); it goes to the debug log instead.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            if bounded:
                cache = Path(tmp) / "ranges.json"
                augmented = Path(tmp) / "augmented.onnx"
                _calibrate(pre, augmented, reader, method, op_types, extra, cache)
            quantize_static(
                str(pre),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=bool(recipe.reduce_range),
                activation_type=QuantType.QInt8
                if recipe.activations == "int8"
                else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=float_ends(pre) if recipe.keep_ends_float else [],
                extra_options=extra,
                op_types_to_quantize=op_types,
                calibration_cache_path=cache,
            )
        if printed.getvalue().strip():
            logger.debug("quantizer: %s", " | ".join(printed.getvalue().split("\n")))


def _calibrate(
    pre: Path,
    augmented: Path,
    reader: _Reader,
    method: Any,
    op_types: list[str] | None,
    extra: dict[str, Any],
    cache: Path,
) -> None:
    """Calibrate ``pre`` as ``quantize_static`` would (its calibrator, options and batches) on a
    lean session, and write the ranges to ``cache`` (ONNX Runtime's calibration cache, JSON)."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # quantize_static's own default operator types and option names, as it passes them on.
    calibrated = op_types or sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    options = {"percentile": extra["CalibPercentile"]} if "CalibPercentile" in extra else {}
    calibrator = create_calibrator(
        pre,
        calibrated,
        augmented_model_path=str(augmented),
        calibrate_method=method,
        extra_options=options,
    )
    _lean_session(calibrator)
    stride = int(extra["CalibStridedMinMax"])
    for start in range(0, len(reader), stride):
        reader.set_range(start_index=start, end_index=start + stride)
        calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)
    del calibrator  # its session and collected outputs, before the quantiser loads the graph


def score(runtime: GraphRuntime, scans: Sequence[ScanSlices]) -> dict[str, Scored]:
    """Outputs of ``runtime`` on every slice of every scan, by scan id."""
    return {scan.scan_id: runtime_outputs(runtime, scan.slices) for scan in scans}


def gate(
    recipe: Recipe | str,
    scans: Sequence[ScanSlices],
    fp32: dict[str, Scored],
    int8: Any,
    threshold: float,
    candidate: str = "int8",
) -> GateResult:
    """A gated graph (``candidate``: int8, bf16; its runtime or its outputs by scan id) against
    fp32 on ``scans``: :func:`judge` on measured outputs."""
    name = recipe if isinstance(recipe, str) else recipe.name
    measured = int8 if isinstance(int8, dict) else score(int8, scans)
    rows = []
    for scan in scans:
        a, b = fp32[scan.scan_id], measured[scan.scan_id]
        rows.append(
            {
                "scan": scan.scan_id,
                "fp32": a.scan_probability,
                candidate: b.scan_probability,
                "n_slices": len(scan.slices),
                "max_slice_dp": float(np.abs(a.p.astype(np.float64) - b.p).max(initial=0.0)),
                "max_slice_dz": float(np.abs(a.z.astype(np.float64) - b.z).max(initial=0.0)),
            }
        )
    return judge(name, rows, threshold, candidate)


def judge(
    recipe: str, rows: list[dict[str, Any]], threshold: float, candidate: str = "int8"
) -> GateResult:
    """The accuracy gate on measured outputs: per scan |``candidate`` - fp32| and labels, and per
    slice the largest probability (``max_slice_dp``) and logit (``max_slice_dz``) differences.
    bf16 is held to the int8 tolerances: both are what the serving runtime may cost."""
    worst = max((abs(r[candidate] - r["fp32"]) for r in rows), default=0.0)
    slice_dp = max((r.get("max_slice_dp", 0.0) for r in rows), default=0.0)
    slice_dz = max((r.get("max_slice_dz", 0.0) for r in rows), default=0.0)
    flips = [r["scan"] for r in rows if (r[candidate] >= threshold) != (r["fp32"] >= threshold)]
    passed = (
        bool(rows)
        and worst <= INT8_TOLERANCE
        and slice_dp <= INT8_SLICE_TOLERANCE
        and slice_dz <= INT8_LOGIT_TOLERANCE
        and not flips
    )
    return GateResult(
        recipe,
        passed,
        round(worst, 6),
        flips,
        rows,
        max_slice_probability_difference=round(slice_dp, 6),
        max_slice_logit_difference=round(slice_dz, 6),
        n_slices=sum(int(r.get("n_slices", 0)) for r in rows),
        candidate=candidate,
    )


def flip_rate_upper_bound(flips: int, n: int, confidence: float = CONFIDENCE) -> float:
    """Exact (Clopper-Pearson) one-sided upper confidence bound on a rate seen ``flips`` times
    in ``n`` trials: the rate p at which P(X <= flips) = 1 - ``confidence`` for X ~ Bin(n, p).

    With no flip it is ``1 - (1 - confidence) ** (1 / n)`` (about 3/n at 95%, "rule of three").
    """
    if n <= 0:
        return 1.0
    if not 0 <= flips <= n:
        raise ValueError(f"flips must be within 0..{n}. Received: {flips}.")
    alpha = 1.0 - confidence
    if flips == n:
        return 1.0
    if flips == 0:
        return 1.0 - alpha ** (1.0 / n)

    def cdf(p: float) -> float:  # P(X <= flips), falling in p
        log_q, log_p = math.log1p(-p), math.log(p)
        return sum(
            math.exp(
                math.lgamma(n + 1)
                - math.lgamma(k + 1)
                - math.lgamma(n - k + 1)
                + k * log_p
                + (n - k) * log_q
            )
            for k in range(flips + 1)
        )

    lo, hi = flips / n, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > alpha else (lo, mid)
    return hi


def check_slices(
    scans: Sequence[ScanSlices], fp32: dict[str, Scored], int8: dict[str, Scored], n: int
) -> tuple[np.ndarray, list[str]]:
    """The ``n`` slices where int8's logit moved most from fp32's: the int8 load check's
    inputs, the slices most sensitive to a change in the int8 arithmetic. Returns them and
    where each came from (``scan_id[index]``, the index among the scan's model slices)."""
    candidates = [
        (float(abs(float(fp32[s.scan_id].z[i]) - float(int8[s.scan_id].z[i]))), k, i)
        for k, s in enumerate(scans)
        for i in range(len(s.slices))
    ]
    chosen = sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))[:n]
    slices = np.stack([scans[k].slices[i] for _, k, i in chosen])
    return slices, [f"{scans[k].scan_id}[{i}]" for _, k, i in chosen]


def write_check(
    path: Path, slices: np.ndarray, fp32: OnnxRuntime, int8: Any, name: str = "int8"
) -> dict[str, Any]:
    """Write the load check of a gated graph (runtime ``name``: ``slices`` with their fp32 and
    gated outputs, each graph run on them in one batch, as the load check runs them); returns
    its record."""
    x = slices[..., None].astype(np.float32)
    p32, z32 = fp32.predict_with_logits(x)
    p8, z8 = int8.predict_with_logits(x)
    arrays = {
        "slices": slices.astype(np.uint8),
        "fp32_logit": z32,
        f"{name}_logit": z8,
        "fp32_probability": p32,
        f"{name}_probability": p8,
    }
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return {
        "n_slices": len(slices),
        "logit_tolerance": CHECK_LOGIT_TOLERANCE,
        f"max_logit_difference_{name}_vs_fp32": float(np.abs(z8.astype(np.float64) - z32).max()),
    }


# -- the record --------------------------------------------------------------------------


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
