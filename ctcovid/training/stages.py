"""The network being trained: the two stages of freezing, their compiles, the training-only
augmentation, and the BatchNormalization re-estimation that short from-scratch runs need.

BatchNormalization trap: from scratch, the moving statistics (momentum 0.99) lag far behind the
weights in a short run, so inference-mode predictions come out constant although training
accuracy looks fine. With pretrained weights the backbones' BN layers stay in inference mode
(Keras' fine-tuning guidance); from scratch the statistics are re-estimated over training batches
before every validation (:func:`recalibrate_batchnorm`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ctcovid.model.build import backbone_models
from ctcovid.training.config import TrainConfig
from ctcovid.training.feed import SliceBatches


def batchnorm_layers(model: keras.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer inside ``model``, nested models included."""
    out: list[keras.layers.BatchNormalization] = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.layers.BatchNormalization):
            out.append(layer)
        else:
            out.extend(batchnorm_layers(layer))
    return out


def training_model(core: keras.Model, config: TrainConfig) -> keras.Model:
    """``core`` behind the training-only augmentation; the saved model is ``core`` alone."""
    size = config.input_size
    inputs = keras.Input((size, size, 1), name="slice")
    x = inputs
    if config.augment:
        x = keras.layers.RandomFlip("horizontal", seed=config.seed, name="random_flip")(x)
        x = keras.layers.RandomRotation(
            config.rotation, fill_mode="nearest", seed=config.seed + 1, name="random_rotation"
        )(x)
    return keras.Model(inputs, core(x), name="res_dense_net_training")


def zero_head(core: keras.Model) -> None:
    """Start the head at P(COVID) = 0.5 for every slice: zero kernel and bias of ``p_covid``.

    A randomly initialised head on the fused features gives logits of a few units for random
    reasons, so training starts from confident guesses; a zero head starts at the chance loss
    and only grows where the gradient points.
    """
    head = core.get_layer("p_covid")
    head.kernel.assign(np.zeros(head.kernel.shape, "float32"))
    head.bias.assign(np.zeros(head.bias.shape, "float32"))


def set_stage(core: keras.Model, stage: int, config: TrainConfig) -> None:
    """Stage 1: both backbones frozen. Stage 2: each unfrozen except its first layers
    (``config.stage2_frozen_layers``).

    With pretrained weights every BN layer stays frozen, hence in inference mode: fine-tuning
    with batch statistics would wreck the ImageNet statistics on small batches.
    """
    for backbone in backbone_models(core):
        backbone.trainable = stage == 2
        if stage == 2:
            for layer in backbone.layers[: config.stage2_frozen_layers]:
                layer.trainable = False
            if config.pretrained:
                for bn in batchnorm_layers(backbone):
                    bn.trainable = False


def _jit_compile(config: TrainConfig) -> bool:
    if keras.config.backend() == "jax":
        return True  # without jit JAX runs op by op
    if config.jit_compile != "auto":
        return config.jit_compile == "true"
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf  # guarded: only on the TensorFlow backend

        return bool(tf.config.list_physical_devices("GPU"))
    return False


def compile_stage(trainer: keras.Model, stage: int, config: TrainConfig) -> None:
    """One compile per stage; every epoch of the stage reuses the same compiled step."""
    name = "adam" if stage == 1 else config.stage2_optimizer
    optimizer = (
        keras.optimizers.Adam(config.lr) if name == "adam" else keras.optimizers.RMSprop(config.lr)
    )
    trainer.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
        jit_compile=_jit_compile(config),
    )


class TrainingModeForward(keras.Model):
    """Calls the core in training mode, so a compiled predict updates the BN moving statistics."""

    def __init__(self, core: keras.Model) -> None:
        super().__init__(name="bn_recalibration")
        self.core = core

    def call(self, x: Any) -> Any:
        return self.core(x, training=True)


def recalibrate_batchnorm(
    forward: keras.Model, core: keras.Model, feed: SliceBatches, n_batches: int
) -> int:
    """Set every trainable BN layer's moving statistics to their average over training batches.

    Momentum is set to 0 while ``forward`` runs (it is compiled on first use with that value), so
    each batch leaves its own statistics in the moving variables; they are averaged here, then the
    momentum is restored. Returns the number of batches used.
    """
    layers = [bn for bn in batchnorm_layers(core) if bn.trainable]
    if not layers or n_batches < 1:
        return 0
    momenta = [bn.momentum for bn in layers]
    sums = [(np.zeros(bn.moving_mean.shape), np.zeros(bn.moving_variance.shape)) for bn in layers]
    n = min(n_batches, len(feed))
    try:
        for bn in layers:
            bn.momentum = 0.0
        for i in range(n):
            x, _, _ = feed[i]
            forward.predict_on_batch(x)
            for (mean, var), bn in zip(sums, layers, strict=True):
                mean += keras.ops.convert_to_numpy(bn.moving_mean)
                var += keras.ops.convert_to_numpy(bn.moving_variance)
        for (mean, var), bn in zip(sums, layers, strict=True):
            bn.moving_mean.assign(mean / n)
            bn.moving_variance.assign(var / n)
    finally:
        for bn, m in zip(layers, momenta, strict=True):
            bn.momentum = m
    return n
