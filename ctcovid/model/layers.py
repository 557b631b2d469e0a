"""Small serializable layers of the Res-Dense Net (no Lambda layers, so saving stays safe)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

# Per-channel constants of keras.applications' preprocess_input modes, for RGB input in [0, 255].
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "torch", "tf", "none")


@keras.saving.register_keras_serializable(package="ctcovid")
class ImageNetPreprocess(keras.layers.Layer):
    """The ImageNet input normalisation a backbone was trained with, applied once.

    ``caffe`` (ResNet v1): RGB -> BGR, subtract the ImageNet mean; ``torch`` (DenseNet): scale to
    [0, 1], subtract mean, divide by std; ``tf`` (ResNet v2, MobileNet): scale to [-1, 1];
    ``none``: the backbone rescales itself (EfficientNet, ConvNeXt).

    A one-channel (grey) input comes out with the three channels the backbone expects, by the
    same per-element arithmetic as the grey slice repeated into RGB first: its three channels
    are equal, so the BGR flip changes nothing, and subtracting (and dividing by) a per-channel
    constant broadcasts the one channel to three. The exported graph then has neither the
    repeat (ONNX ``Tile``) nor the flip (``ReverseSequence`` between two ``Transpose``); only
    ``tf`` and ``none``, whose arithmetic has no per-channel constant, still repeat.
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}.")
        self.mode = mode

    def call(self, x: Any) -> Any:
        if x.shape[-1] not in (1, 3):
            raise ValueError(
                f"{self.name}: input must have 1 (grey) or 3 (RGB) channels. "
                f"Received: shape={tuple(x.shape)}."
            )
        gray = x.shape[-1] == 1
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            if not gray:
                x = ops.flip(x, axis=-1)
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "tf":
            x = x / 127.5 - 1.0
        return ops.repeat(x, 3, axis=-1) if gray else x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="ctcovid")
class GrayToRGB(keras.layers.Layer):
    """Repeat a one-channel slice into the three channels ImageNet backbones expect.

    No longer part of new models (:class:`ImageNetPreprocess` broadcasts a grey slice itself);
    kept registered so that objects saved with it still deserialize. It holds no weights, so
    weight files saved with it load into the models built without it.
    """

    def call(self, x: Any) -> Any:
        x = ops.cast(x, self.compute_dtype)
        if x.shape[-1] == 3:
            return x
        return ops.repeat(x, 3, axis=-1)
