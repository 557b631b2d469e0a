"""The Res-Dense Net and its saved artifact."""

from ctcovid.model.artifact import (
    ModelArtifact,
    default_model_path,
    load_model,
    read_artifact,
    save_model,
)

__all__ = ["ModelArtifact", "default_model_path", "load_model", "read_artifact", "save_model"]
