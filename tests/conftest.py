"""Shared fixtures: synthetic studies and a tiny (untrained) model, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_INPUT_SIZE = 32


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The module of the suite's one training run first, the others in their order: it is the
    longest, and under ``make test``'s two workers the other worker runs the rest meanwhile."""
    items.sort(key=lambda item: item.path.name != "test_training.py")


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


@pytest.fixture(scope="session")
def tiny_classifier(tiny_model_dir: Path):
    """The tiny model loaded once for the session (``Classifier.from_file``): each load builds
    both backbones again and compiles its own predict function, seconds every time.

    Tests share its Keras model and must not change its weights. A module that changes a
    Classifier's settings (artifact, batch size) takes its own over the same model:
    ``Classifier(tiny_classifier.model, tiny_classifier.artifact)``.
    """
    from ctcovid.inference import Classifier

    return Classifier.from_file(tiny_model_dir)


@pytest.fixture(scope="module")
def classifier(tiny_classifier):
    """A Classifier over the session's tiny model, for one module to configure as it likes."""
    from ctcovid.inference import Classifier

    return Classifier(tiny_classifier.model, tiny_classifier.artifact)


@pytest.fixture
def pacs():
    """An SR storage SCP on loopback that keeps what it receives: ``(Peer, datasets)``."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage

    from ctcovid.net.peers import Peer

    received: list = []

    def handle(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    yield Peer("127.0.0.1", int(server.server_address[1]), "PACS"), received
    server.shutdown()


@pytest.fixture(scope="session")
def unbounded_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with its ingest's size limits (rows, columns) raised far enough that a
    decompression bomb passes the header checks and reaches the decoder: for tests of the
    decoder's memory limit, the backstop behind those checks."""
    import json
    import shutil

    from ctcovid.model.artifact import METADATA_FILE

    out = tmp_path_factory.mktemp("models") / "unbounded"
    shutil.copytree(tiny_model_dir, out)
    meta = json.loads((out / METADATA_FILE).read_text())
    meta["ingest"]["max_rows_columns"] = 65535
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return out


TRAINED_INPUT_SIZE = 64  # the smallest size whose CAM has a grid (2 x 2) to look at
TRAINED_EPOCHS = 4
TRAINED_MAX_SLICES = 4


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The suite's one training run, through ``ctcovid train``: a from-scratch Res-Dense Net
    (default architecture, stage 2 only, Adam) at 64 px on an easy COV19-CT-DB-layout fixture
    set. Many scans with few slices each (so that it cannot pass by memorising scans), lr 1e-3,
    32 steps; about a third of its time goes to compiling the training step once.

    Returns the CLI's JSON summary with the paths and settings tests need, and a loaded
    ``Classifier`` for tests that predict without going through the CLI again.
    """
    import json

    from typer.testing import CliRunner

    import dicom_fixtures
    from ctcovid.cli.main import app
    from ctcovid.inference import Classifier

    root = tmp_path_factory.mktemp("trained")
    data = root / "cov19"
    # Six slices a scan, four kept by the slice policy: 64 scans, 256 training slices, 8 steps
    # an epoch; 32 validation scans, so that beating chance is a real margin (validating is cheap).
    dicom_fixtures.write_cov19_layout(data, n_per_class=32, n_slices=6, size=64, seed=11)
    dicom_fixtures.write_cov19_layout(
        data, n_per_class=16, n_slices=6, size=64, seed=12, split="val"
    )
    model, cache = root / "model", root / "cache"
    result = CliRunner().invoke(app, [
        "train", str(data), "--out", str(model), "--weights", "none",
        "--input-size", str(TRAINED_INPUT_SIZE), "--epochs", str(TRAINED_EPOCHS),
        "--max-slices", str(TRAINED_MAX_SLICES), "--min-slices", "4", "--lr", "1e-3",
        "--seed", "0", "--cache", str(cache), "--json",
    ])
    assert result.exit_code == 0, result.output
    return {
        "summary": json.loads(result.stdout),
        "data_dir": data,
        "model_dir": model,
        "cache_dir": cache,
        "epochs": TRAINED_EPOCHS,
        "max_slices": TRAINED_MAX_SLICES,
        "n_val": 32,
        "classifier": Classifier.from_file(model),
    }


@pytest.fixture(scope="session")
def trained_model_dir(trained_run: dict) -> Path:
    """A Res-Dense Net trained (briefly, from scratch, 64 px) to tell the fixture classes apart."""
    return trained_run["model_dir"]
