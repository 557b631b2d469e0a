"""The model artifact: a folder holding the weights and everything inference must reproduce.

``MODEL/ctcovid.json`` carries the architecture, the ingest settings (window, input size, slice
policy), the decision threshold, the class meaning, name, version and a device UID derived from the
weights; ``MODEL/model.weights.h5`` the Keras weights. Inference rebuilds the network from the
settings and loads the weights, so it cannot silently preprocess differently from training.

``ctcovid export`` may add inference graphs (``model.onnx``, ``model.int8.onnx``); each is recorded
under ``graphs`` in ``ctcovid.json`` with its sha256 and the weights it was exported from. Readers
that predate ``graphs`` ignore the key and keep using the Keras weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ctcovid import __version__
from ctcovid.config import IngestConfig, ModelConfig
from ctcovid.errors import ModelError
from ctcovid.fsio import write_atomic
from ctcovid.report.uids import derive_uid
from ctcovid.results import ModelInfo

logger = logging.getLogger(__name__)

FORMAT = "ctcovid-model"
FORMAT_VERSION = 1
METADATA_FILE = "ctcovid.json"
WEIGHTS_FILE = "model.weights.h5"
MODEL_NAME = "ctcovid Res-Dense Net"
ENV_MODEL = "CTCOVID_MODEL"


def default_model_path() -> Path:
    """``$CTCOVID_MODEL``, else ``$XDG_DATA_HOME/ctcovid/model`` (``~/.local/share/...``)."""
    env = os.environ.get(ENV_MODEL)
    if env:
        return Path(env)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "ctcovid" / "model"


def missing_model_message(path: Path) -> str:
    return (
        f"no model at {path}. Train one with 'ctcovid train DATA --out {path}' "
        f"(see README, 'Training a real model'), or pass --model PATH, or set ${ENV_MODEL}"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelArtifact:
    """What ``ctcovid.json`` says about a model."""

    model_config: ModelConfig
    ingest_config: IngestConfig
    threshold: float = 0.5
    name: str = MODEL_NAME
    version: str = __version__
    weights_sha256: str = ""
    created: str = ""
    positive_class: str = "covid"
    negative_class: str = "non-covid"
    training: dict[str, Any] = field(default_factory=dict)
    # Exported inference graphs by runtime name ("onnx", "int8"): file, sha256, provenance.
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The runtime this artifact was loaded for (not stored): it is part of the result's identity.
    runtime: str = "keras"
    graph_sha256: str = ""

    @property
    def base_device_uid(self) -> str:
        """Changes whenever the weights change: the model's identity under Keras."""
        return derive_uid("ctcovid-model", self.weights_sha256 or "untrained")

    @property
    def device_uid(self) -> str:
        """PS3.3 DeviceUID of the algorithm: changes with the weights, the runtime and its graph.

        Another runtime gives (slightly) different numbers, so its results are different content
        and get other UIDs. Keras keeps the UID of the weights alone.
        """
        if self.runtime == "keras":
            return self.base_device_uid
        return derive_uid(
            "ctcovid-model", self.weights_sha256 or "untrained", self.runtime, self.graph_sha256
        )

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name, version=self.version, device_uid=self.device_uid, runtime=self.runtime
        )

    def with_runtime(self, runtime: str, graph_sha256: str = "") -> ModelArtifact:
        """This artifact as loaded for ``runtime`` (whose graph has ``graph_sha256``)."""
        return replace(self, runtime=runtime, graph_sha256=graph_sha256)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "device_uid": self.base_device_uid,
            "weights_sha256": self.weights_sha256,
            "created": self.created,
            "output": f"sigmoid = P({self.positive_class})",
            "classes": {"positive": self.positive_class, "negative": self.negative_class},
            "threshold": self.threshold,
            "model": self.model_config.to_dict(),
            "ingest": self.ingest_config.to_dict(),
            "training": self.training,
            **({"graphs": self.graphs} if self.graphs else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> ModelArtifact:
        if data.get("format") != FORMAT:
            raise ModelError(f"{source}: not a ctcovid model (format {data.get('format')!r})")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelError(
                f"{source}: model format {data['format_version']} is newer than this ctcovid "
                f"supports ({FORMAT_VERSION}); upgrade ctcovid"
            )
        try:
            return cls(
                model_config=ModelConfig.from_dict(data["model"]),
                ingest_config=IngestConfig.from_dict(data["ingest"]),
                threshold=float(data["threshold"]),
                name=str(data.get("name", MODEL_NAME)),
                version=str(data.get("version", "")),
                weights_sha256=str(data.get("weights_sha256", "")),
                created=str(data.get("created", "")),
                positive_class=str(data["classes"]["positive"]),
                negative_class=str(data["classes"]["negative"]),
                training=dict(data.get("training", {})),
                graphs={str(k): dict(v) for k, v in dict(data.get("graphs", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}/{METADATA_FILE}: invalid metadata ({exc})") from exc


def save_model(model: Any, artifact: ModelArtifact, out: Path) -> ModelArtifact:
    """Write weights and metadata into folder ``out`` (weights first, metadata last, atomically)."""
    weights = write_atomic(out / WEIGHTS_FILE, lambda tmp: model.save_weights(tmp))
    artifact = replace(
        artifact,
        weights_sha256=sha256_file(weights),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        model_config=replace(artifact.model_config, weights=None),
    )
    write_metadata(artifact, out)
    return artifact


def write_metadata(artifact: ModelArtifact, folder: Path) -> None:
    """Write ``ctcovid.json`` atomically and durably."""
    write_atomic(folder / METADATA_FILE, json.dumps(artifact.to_json(), indent=2) + "\n")


def read_artifact(path: Path) -> ModelArtifact:
    """Read ``ctcovid.json`` of a model folder, with errors that say what to do."""
    path = Path(path)
    meta = path / METADATA_FILE
    if not path.exists():
        raise ModelError(missing_model_message(path))
    if not meta.is_file():
        raise ModelError(f"{path}: not a ctcovid model folder (no {METADATA_FILE})")
    try:
        data = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta}: unreadable ({exc})") from exc
    return ModelArtifact.from_json(data, path)


def load_model(path: Path, *, verify: bool = True) -> tuple[Any, ModelArtifact]:
    """Rebuild the network of a model folder and load its weights."""
    from ctcovid.model.build import build_res_dense

    path = Path(path)
    artifact = read_artifact(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{path}: weights file {WEIGHTS_FILE} is missing")
    if verify and artifact.weights_sha256 and sha256_file(weights) != artifact.weights_sha256:
        raise ModelError(
            f"{weights}: weights do not match {METADATA_FILE} (sha256 differs); the model folder "
            "was modified or copied incompletely"
        )
    model = build_res_dense(replace(artifact.model_config, weights=None))
    try:
        model.load_weights(weights)
    except Exception as exc:
        raise ModelError(f"{weights}: cannot load weights ({type(exc).__name__}: {exc})") from exc
    return model, artifact
