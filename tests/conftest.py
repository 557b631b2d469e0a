"""Shared fixtures: synthetic studies and a tiny (untrained) model, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_INPUT_SIZE = 32


@pytest.fixture(scope="session")
def studies_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small fixture studies (two positive, two negative) at 64 px, 12 lung slices each."""
    import dicom_fixtures

    root = tmp_path_factory.mktemp("studies")
    dicom_fixtures.generate_studies(root, 4, seed=7, n_slices=12, size=64)
    return root


@pytest.fixture(scope="session")
def study_infos(studies_root: Path) -> list:
    import json

    return json.loads((studies_root / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained Res-Dense Net (the real architecture) at 32 px, saved as an artifact.

    Its outputs are meaningless but deterministic: enough for every test that checks plumbing
    (classify, SR, node, batch) rather than accuracy.
    """
    import keras

    from ctcovid.config import IngestConfig, ModelConfig
    from ctcovid.model.artifact import ModelArtifact, save_model
    from ctcovid.model.build import build_res_dense

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny"
    config = ModelConfig(input_size=TINY_INPUT_SIZE)
    model = build_res_dense(config)
    save_model(
        model,
        ModelArtifact(
            model_config=config,
            ingest_config=IngestConfig(image_size=TINY_INPUT_SIZE, min_slices=4),
        ),
        out,
    )
    return out
