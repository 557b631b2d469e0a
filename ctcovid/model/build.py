"""The Res-Dense Net: two ImageNet backbones side by side, fused by Add, GAP and a sigmoid head.

Backend-agnostic Keras 3: no TensorFlow import here, so ``KERAS_BACKEND=jax`` works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from ctcovid.config import ModelConfig
from ctcovid.errors import ModelError
from ctcovid.model.layers import ImageNetPreprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """A ``keras.applications`` network usable as one branch."""

    name: str
    constructor: Callable[..., keras.Model]
    preprocess_mode: str
    weights_file: str  # the standard no-top weights file name, for air-gapped sites


def _app(name: str) -> Callable[..., keras.Model]:
    return getattr(keras.applications, name)  # type: ignore[no-any-return]


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone(
            "resnet50",
            _app("ResNet50"),
            "caffe",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "resnet101",
            _app("ResNet101"),
            "caffe",
            "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "resnet152",
            _app("ResNet152"),
            "caffe",
            "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "resnet50v2",
            _app("ResNet50V2"),
            "tf",
            "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "resnet101v2",
            _app("ResNet101V2"),
            "tf",
            "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "resnet152v2",
            _app("ResNet152V2"),
            "tf",
            "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "mobilenetv2",
            _app("MobileNetV2"),
            "tf",
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        ),
        Backbone("efficientnetb0", _app("EfficientNetB0"), "none", "efficientnetb0_notop.h5"),
        Backbone(
            "densenet121",
            _app("DenseNet121"),
            "torch",
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "densenet169",
            _app("DenseNet169"),
            "torch",
            "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "densenet201",
            _app("DenseNet201"),
            "torch",
            "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
    ]
}

WEIGHTS_HELP = (
    "use --weights none to train from scratch, or --weights DIR with the standard Keras "
    "no-top weight files ({files}) copied from a machine with internet access "
    "(they are cached under ~/.keras/models/ after a download)"
)


def parse_backbones(text: str | tuple[str, ...] | list[str]) -> tuple[str, str]:
    """``"resnet101,densenet121"`` -> ``("resnet101", "densenet121")``, validated."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text)]
    if len(names) != 2:
        raise ModelError(f"backbones must name exactly two networks. Received: {text!r}.")
    for n in names:
        if n not in BACKBONES:
            raise ModelError(f"unknown backbone {n!r}; choose from {', '.join(sorted(BACKBONES))}.")
    return names[0], names[1]


def _resolve_weights(backbone: Backbone, weights: str | None) -> str | None:
    if weights in (None, "none", ""):
        return None
    if weights == "imagenet":
        return "imagenet"
    folder = Path(weights)
    path = folder / backbone.weights_file if folder.is_dir() else folder
    if not path.is_file():
        raise ModelError(
            f"weights for {backbone.name} not found: expected {folder / backbone.weights_file}"
        )
    return str(path)


def _backbone(backbone: Backbone, config: ModelConfig) -> keras.Model:
    weights = _resolve_weights(backbone, config.weights)
    try:
        return backbone.constructor(
            include_top=False,
            weights=weights,
            input_shape=(config.input_size, config.input_size, 3),
            name=backbone.name,
        )
    except Exception as exc:
        if weights != "imagenet":
            raise ModelError(f"cannot build {backbone.name} with weights {weights}: {exc}") from exc
        files = ", ".join(BACKBONES[n].weights_file for n in config.backbones)
        raise ModelError(
            f"cannot download ImageNet weights for {backbone.name} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            + WEIGHTS_HELP.format(files=files)
        ) from exc


def build_res_dense(config: ModelConfig | None = None) -> keras.Model:
    """Build the Res-Dense Net of ``config``.

    Input: a grey slice of shape (S, S, 1) in the uint8 range [0, 255]. Each branch applies its
    own ImageNet preprocessing exactly once, straight on the grey slice: the preprocessing
    broadcasts it to the three channels its backbone expects, with the arithmetic of the grey
    slice repeated into RGB (the ``GrayToRGB`` layer of earlier models, which held no weights,
    so their weight files load into this network). The first branch's features are projected by a
    1x1 Conv2D to the second branch's channel count, the two are added, globally average-pooled,
    dropped out and fed to Dense(1, sigmoid) = P(COVID).
    """
    config = config or ModelConfig()
    first, second = (BACKBONES[n] for n in parse_backbones(config.backbones))
    size = config.input_size
    inputs = keras.Input((size, size, 1), name="slice")
    branches = []
    for backbone in (first, second):
        x = ImageNetPreprocess(backbone.preprocess_mode, name=f"{backbone.name}_preprocess")(inputs)
        branches.append(_backbone(backbone, config)(x))
    a, b = branches
    if a.shape[1:3] != b.shape[1:3]:
        raise ModelError(
            f"backbones {first.name} and {second.name} give feature maps of different sizes "
            f"({a.shape[1:3]} vs {b.shape[1:3]}); they cannot be fused by Add"
        )
    a = keras.layers.Conv2D(b.shape[-1], 1, name=f"{first.name}_projection")(a)
    fused = keras.layers.Add(name="fusion")([a, b])
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(fused)
    dropped = keras.layers.Dropout(config.dropout, name="dropout")(pooled)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="p_covid", dtype="float32")(dropped)
    return keras.Model(inputs, outputs, name="res_dense_net")


def backbone_models(model: keras.Model) -> list[keras.Model]:
    """The two backbone sub-models of a Res-Dense Net, in branch order."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def cam_model(model: keras.Model) -> keras.Model:
    """A model returning (fused feature map, P(COVID)) for class-activation maps."""
    fused = model.get_layer("fusion").output
    return keras.Model(model.inputs, [fused, model.output], name="res_dense_cam")
