"""The grey slice goes straight into each branch's preprocessing, which broadcasts it to RGB.

Earlier models repeated the one-channel slice into three (``GrayToRGB``) before each branch's
ImageNet preprocessing; the exported graph then spent time on a ``Tile`` and, for the caffe mode's
RGB -> BGR flip, on a ``ReverseSequence`` between two ``Transpose``. On a grey slice the flip is
the identity and "repeat, then subtract a per-channel constant" is "subtract the constant,
broadcasting", so the network now does the latter. These tests hold the new layout to the old one
byte for byte, old weight files to the new network, and the exported graph to what it no longer
holds.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from ctcovid.config import IngestConfig, ModelConfig
from ctcovid.model.artifact import WEIGHTS_FILE, ModelArtifact, load_model, save_model
from ctcovid.model.build import (
    BACKBONES,
    _backbone,
    backbone_models,
    build_res_dense,
    cam_model,
    parse_backbones,
)
from ctcovid.model.layers import MODES, GrayToRGB, ImageNetPreprocess

SIZE = 32
PAIRS = [
    ("resnet101", "densenet121"),  # caffe + torch: the default model
    ("mobilenetv2", "efficientnetb0"),  # tf + none
]


def grey_slices(n: int, seed: int) -> np.ndarray:
    """Random slices in the uint8 range as the model takes them: (n, SIZE, SIZE, 1) float32."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1)).astype("float32")


def old_layout(config: ModelConfig) -> keras.Model:
    """The network as earlier versions built it: GrayToRGB first, then each branch's
    three-channel preprocessing (fresh layers and weights, as a model trained then)."""
    first, second = (BACKBONES[n] for n in parse_backbones(config.backbones))
    inputs = keras.Input((config.input_size, config.input_size, 1), name="slice")
    rgb = GrayToRGB(name="gray_to_rgb")(inputs)
    branches = []
    for backbone in (first, second):
        x = ImageNetPreprocess(backbone.preprocess_mode, name=f"{backbone.name}_preprocess")(rgb)
        branches.append(_backbone(backbone, config)(x))
    a, b = branches
    a = keras.layers.Conv2D(b.shape[-1], 1, name=f"{first.name}_projection")(a)
    fused = keras.layers.Add(name="fusion")([a, b])
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(fused)
    dropped = keras.layers.Dropout(config.dropout, name="dropout")(pooled)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="p_covid", dtype="float32")(dropped)
    return keras.Model(inputs, outputs, name="res_dense_net")


def old_layout_of(model: keras.Model) -> keras.Model:
    """The old layout over the very layers (and so weights) of the new ``model``."""
    inputs = keras.Input(model.input_shape[1:], name="slice")
    rgb = GrayToRGB(name="gray_to_rgb")(inputs)
    branches = []
    for backbone in backbone_models(model):
        mode = model.get_layer(f"{backbone.name}_preprocess").mode
        x = ImageNetPreprocess(mode, name=f"{backbone.name}_preprocess")(rgb)
        branches.append(backbone(x))
    a, b = branches
    a = model.get_layer(f"{backbone_models(model)[0].name}_projection")(a)
    fused = keras.layers.Add(name="fusion")([a, b])
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(fused)
    dropped = model.get_layer("dropout")(pooled)
    return keras.Model(inputs, model.get_layer("p_covid")(dropped), name="res_dense_net")


def outputs_bytes(model: keras.Model, x: np.ndarray) -> tuple[bytes, ...]:
    """P(COVID) from the compiled predict function (what the export checks against) and the
    fused feature map with P(COVID) from a direct call (what inference and its CAMs run)."""
    fused, p = cam_model(model)([x], training=False)
    return (
        np.asarray(model.predict_on_batch(x)).tobytes(),
        np.asarray(fused).tobytes(),
        np.asarray(p).tobytes(),
    )


@pytest.fixture(scope="module")
def default_model() -> keras.Model:
    """The default Res-Dense Net (resnet101 + densenet121), untrained, at 32 px."""
    keras.utils.set_random_seed(3)
    return build_res_dense(ModelConfig(input_size=SIZE))


@pytest.mark.parametrize("mode", MODES)
def test_grey_preprocessing_is_repeat_then_preprocess_to_the_byte(mode):
    grey = grey_slices(2, seed=1)
    layer = ImageNetPreprocess(mode)
    broadcast = np.asarray(layer(grey))
    repeated = np.asarray(layer(GrayToRGB()(grey)))
    assert broadcast.shape == repeated.shape == (2, SIZE, SIZE, 3)
    assert broadcast.dtype == repeated.dtype == np.float32
    assert broadcast.tobytes() == repeated.tobytes()


def test_other_channel_counts_are_refused():
    with pytest.raises(ValueError, match=r"1 \(grey\) or 3 \(RGB\) channels"):
        ImageNetPreprocess("caffe")(np.zeros((1, 4, 4, 2), "float32"))


def test_new_models_have_no_gray_to_rgb(default_model):
    assert not [layer for layer in default_model.layers if isinstance(layer, GrayToRGB)]
    for name in ("resnet101_preprocess", "densenet121_preprocess"):
        assert default_model.get_layer(name).input.shape == (None, SIZE, SIZE, 1)
        assert default_model.get_layer(name).output.shape == (None, SIZE, SIZE, 3)


@pytest.mark.parametrize("backbones", PAIRS, ids=",".join)
def test_model_gives_the_bytes_of_the_old_layout(backbones, default_model):
    if backbones == PAIRS[0]:
        model = default_model
    else:
        keras.utils.set_random_seed(4)
        model = build_res_dense(ModelConfig(input_size=SIZE, backbones=backbones))
    old = old_layout_of(model)
    assert any(isinstance(layer, GrayToRGB) for layer in old.layers)
    x = grey_slices(4, seed=4)
    assert outputs_bytes(model, x) == outputs_bytes(old, x)


def test_weights_saved_by_the_old_layout_load_and_give_the_same_bytes(tmp_path: Path):
    """A model folder written before (``ctcovid.json`` + ``model.weights.h5`` of the old layout)
    loads into the new network. Keras 3 keys the h5 groups of a model's layers by class name and
    a per-class counter in layer order, not by layer name: the weightless ``gray_to_rgb`` group
    is left unread and every other key (``image_net_preprocess``, ``functional``, ``conv2d``...)
    is the same in both layouts."""
    config = ModelConfig(input_size=SIZE)
    keras.utils.set_random_seed(5)
    old = old_layout(config)
    save_model(old, ModelArtifact(config, IngestConfig(image_size=SIZE)), tmp_path / "m")
    with h5py.File(tmp_path / "m" / WEIGHTS_FILE, "r") as saved:
        assert "gray_to_rgb" in saved["layers"]
        assert len(saved["layers/gray_to_rgb/vars"]) == 0  # it holds no weights
    keras.utils.set_random_seed(6)  # the new network starts from other weights
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*could not be loaded.*")
        model, _ = load_model(tmp_path / "m")
    assert not any(isinstance(layer, GrayToRGB) for layer in model.layers)
    saved_weights, loaded_weights = old.get_weights(), model.get_weights()
    assert len(saved_weights) == len(loaded_weights)
    for a, b in zip(saved_weights, loaded_weights, strict=True):
        assert a.tobytes() == b.tobytes()
    x = grey_slices(4, seed=7)
    assert outputs_bytes(model, x) == outputs_bytes(old, x)


@pytest.mark.slow
def test_exported_graph_has_no_repeat_or_flip_and_matches_keras(default_model, tmp_path: Path):
    """tf2onnx turned the repeat into ``Tile`` and the flip into ``ReverseSequence``; neither
    is left, and the fp32 graph still agrees with Keras within the export's tolerances. (The
    default run checks the same on the trained model's export, tests/test_training.py.)"""
    pytest.importorskip("tf2onnx")
    import onnx

    from ctcovid.model.export import (
        FP32_LOGIT_TOLERANCE,
        FP32_TOLERANCE,
        add_logit_output,
        convert_to_onnx,
        fp32_difference,
        keras_outputs,
        runtime_outputs,
    )
    from ctcovid.model.runtimes import OnnxRuntime

    model = default_model
    path = tmp_path / "model.onnx"
    convert_to_onnx(model, path, SIZE)
    add_logit_output(path)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops
    assert not ops & {"Tile", "ReverseSequence"}
    slices = grey_slices(6, seed=9)[..., 0].astype(np.uint8)
    difference = fp32_difference(
        keras_outputs(model, slices), runtime_outputs(OnnxRuntime(path, "onnx", ""), slices)
    )
    assert difference["max_slice_difference_vs_keras"] <= FP32_TOLERANCE
    assert difference["max_slice_logit_difference_vs_keras"] <= FP32_LOGIT_TOLERANCE
