"""Every setting of a training run, in one frozen dataclass saved with the run and the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ctcovid.config import IngestConfig, ModelConfig
from ctcovid.errors import ConfigError
from ctcovid.model.build import parse_backbones

DEFAULT_HEAD_EPOCHS = 5  # stage-1 epochs when the backbones are pretrained


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Saved in the run folder and inside the model artifact.

    ``ingest`` and ``model`` are the settings the trained model will carry (every ingest setting
    can be trained with); the rest shape the run only. :meth:`create` builds one from flat
    keyword arguments as the command line has them.

    ``epochs`` counts both stages; the first ``head_epochs`` of them train the head with both
    backbones frozen (``None``: 5 with pretrained weights, 0 from scratch, where a frozen random
    backbone would teach the head nothing). Stage 2 keeps the first ``frozen_layers`` layers of
    each backbone frozen (``None``: the paper's 100 with pretrained weights, 0 from scratch:
    frozen random layers keep nothing worth keeping, and their BatchNormalization statistics,
    never estimated, pass unnormalised activations on; measured here, that made training-mode
    and inference-mode features disagree and validation fail). Stage 2 uses ``optimizer``
    (``None``: the paper's RMSprop with pretrained weights, Adam from scratch: Keras' RMSprop has
    no bias correction, so its first steps move every weight by about 3x the learning rate; a
    random ResNet101 + DenseNet121 never recovered from that in a short run, measured here with
    training accuracy stuck at 0.5, while Adam at the same rate reached validation ROC AUC 0.95).
    """

    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(weights="imagenet"))
    epochs: int = 20
    head_epochs: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    optimizer: str | None = None  # stage 2: "rmsprop" (the paper's) | "adam"
    frozen_layers: int | None = None  # first layers of each backbone frozen in stage 2
    class_weights: bool = False
    augment: bool = True  # random horizontal flip and rotation, training only
    rotation: float = 0.2  # fraction of a full turn, as keras.layers.RandomRotation
    val_fraction: float = 0.25
    seed: int = 0
    bn_batches: int = 16  # training batches that re-estimate BN statistics (from scratch only)
    jit_compile: str = "auto"  # "auto" (XLA where an accelerator is present) | "true" | "false"
    layout: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1. Received: {self.epochs}.")
        if self.head_epochs is not None and not 0 <= self.head_epochs <= self.epochs:
            problems.append(
                f"head_epochs must be between 0 and epochs ({self.epochs}). "
                f"Received: {self.head_epochs}."
            )
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1. Received: {self.batch_size}.")
        if self.lr <= 0:
            problems.append(f"lr must be positive. Received: {self.lr}.")
        if self.optimizer not in (None, "adam", "rmsprop"):
            problems.append(f"optimizer must be adam or rmsprop. Received: {self.optimizer!r}.")
        if self.jit_compile not in ("auto", "true", "false"):
            problems.append(
                f"jit_compile must be auto, true or false. Received: {self.jit_compile!r}."
            )
        if self.ingest.image_size != self.model.input_size:
            problems.append(
                "ingest image_size and model input_size must agree. Received: "
                f"{self.ingest.image_size} and {self.model.input_size}."
            )
        if problems:
            raise ConfigError(" ".join(problems))
        # Validate the backbones now, before anything slow starts.
        parse_backbones(self.model.backbones)

    @classmethod
    def create(
        cls,
        *,
        input_size: int = 256,
        weights: str = "imagenet",
        backbones: Sequence[str] = ("resnet101", "densenet121"),
        dropout: float = 0.5,
        ingest: dict[str, Any] | None = None,
        **run: Any,
    ) -> TrainConfig:
        """A config from flat options: ``input_size`` sets both the slice size and the model
        input; ``weights`` is ``imagenet``, ``none`` or a folder; ``ingest`` holds any other
        :class:`IngestConfig` setting; the remaining keywords are the run's own fields."""
        ingest_kw = {**(ingest or {})}
        if ingest_kw.setdefault("image_size", input_size) != input_size:
            raise ConfigError(
                f"the ingest image_size ({ingest_kw['image_size']}) is the input size: "
                f"use input_size. Received: input_size={input_size}."
            )
        unknown = set(ingest_kw) - {f.name for f in fields(IngestConfig)}
        if unknown:
            raise ConfigError(
                f"unknown ingest setting(s): {', '.join(sorted(unknown))}. Known: "
                + ", ".join(f.name for f in fields(IngestConfig))
            )
        model = ModelConfig(
            input_size=input_size,
            backbones=parse_backbones(tuple(backbones)),
            dropout=dropout,
            weights=None if weights in ("none", "") else weights,
        )
        return cls(ingest=IngestConfig(**ingest_kw), model=model, **run)

    @property
    def input_size(self) -> int:
        return self.model.input_size

    @property
    def pretrained(self) -> bool:
        return self.model.weights is not None

    @property
    def stage2_frozen_layers(self) -> int:
        if self.frozen_layers is not None:
            return self.frozen_layers
        return 100 if self.pretrained else 0

    @property
    def stage2_optimizer(self) -> str:
        if self.optimizer is not None:
            return self.optimizer
        return "rmsprop" if self.pretrained else "adam"

    @property
    def stage1_epochs(self) -> int:
        if self.head_epochs is not None:
            return self.head_epochs
        return min(DEFAULT_HEAD_EPOCHS, self.epochs - 1) if self.pretrained else 0

    def run_dict(self) -> dict[str, Any]:
        """The run's own settings, with the stage settings they resolve to."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NESTED}
        d["stage1_epochs"] = self.stage1_epochs
        d["stage2_frozen_layers"] = self.stage2_frozen_layers
        d["stage2_optimizer"] = self.stage2_optimizer
        return d

    def to_dict(self) -> dict[str, Any]:
        return {"ingest": self.ingest.to_dict(), "model": self.model.to_dict(), **self.run_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)} - _NESTED
        return cls(
            ingest=IngestConfig.from_dict(data.get("ingest", {})),
            model=ModelConfig.from_dict(data.get("model", {})),
            **{k: v for k, v in data.items() if k in known},
        )


_NESTED = frozenset({"ingest", "model"})
