"""The Res-Dense Net: architecture, preprocessing inside the model, artifact round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import keras
import numpy as np
import pytest

from ctcovid.config import IngestConfig, ModelConfig
from ctcovid.errors import ModelError
from ctcovid.model.artifact import ModelArtifact, load_model, read_artifact, save_model
from ctcovid.model.build import backbone_models, build_res_dense, parse_backbones
from ctcovid.model.layers import ImageNetPreprocess


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(1)
    return build_res_dense(ModelConfig(input_size=32))


def test_architecture_follows_the_paper(tiny):
    names = [layer.name for layer in tiny.layers]
    assert [m.name for m in backbone_models(tiny)] == ["resnet101", "densenet121"]
    for name in ("resnet101_projection", "fusion", "gap", "dropout", "p_covid"):
        assert name in names
    assert tiny.get_layer("resnet101_projection").filters == 1024
    assert tiny.get_layer("p_covid").activation.__name__ == "sigmoid"
    assert tiny.output.shape == (None, 1)


def test_each_backbone_preprocesses_exactly_once(tiny):
    pre = [layer for layer in tiny.layers if isinstance(layer, ImageNetPreprocess)]
    assert [(p.name, p.mode) for p in pre] == [
        ("resnet101_preprocess", "caffe"),
        ("densenet121_preprocess", "torch"),
    ]
    for backbone in backbone_models(tiny):
        assert not any(isinstance(layer, ImageNetPreprocess) for layer in backbone.layers)


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("caffe", keras.applications.resnet.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
        ("tf", keras.applications.resnet_v2.preprocess_input),
    ],
)
def test_preprocess_layer_matches_keras_applications(mode, reference):
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = np.asarray(ImageNetPreprocess(mode)(x))
    np.testing.assert_allclose(ours, reference(x.copy()), rtol=1e-5, atol=1e-4)


def test_outputs_are_probabilities(tiny):
    x = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 1)).astype("float32")
    p = np.asarray(tiny.predict_on_batch(x))
    assert p.shape == (3, 1)
    assert np.all((p >= 0) & (p <= 1))


def test_full_size_model_builds_at_256():
    model = build_res_dense(ModelConfig())
    assert model.input_shape == (None, 256, 256, 1)
    assert model.get_layer("fusion").output.shape == (None, 8, 8, 1024)
    assert 50e6 < model.count_params() < 55e6


def test_other_backbone_pairs_fuse_when_the_grids_match():
    model = build_res_dense(ModelConfig(input_size=32, backbones=("resnet50v2", "densenet169")))
    assert model.get_layer("resnet50v2_projection").filters == 1664


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown backbone 'vgg99'"):
        parse_backbones("resnet101,vgg99")


def test_local_weights_folder_without_the_file_names_it(tmp_path):
    with pytest.raises(ModelError, match=r"resnet101_weights_tf_dim_ordering_tf_kernels_notop\.h5"):
        build_res_dense(ModelConfig(input_size=32, weights=str(tmp_path)))


def test_offline_imagenet_download_fails_with_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ModelError) as exc:
        build_res_dense(ModelConfig(input_size=32, weights="imagenet"))
    message = str(exc.value)
    assert "cannot download ImageNet weights" in message
    assert "--weights none" in message and "--weights DIR" in message
    assert "\n" not in message


def test_artifact_round_trip_keeps_predictions_and_settings(tiny, tmp_path):
    ingest = IngestConfig(image_size=32, slice_policy="lung", max_slices=7)
    art = save_model(
        tiny, ModelArtifact(ModelConfig(input_size=32), ingest, threshold=0.37), tmp_path / "m"
    )
    model, loaded = load_model(tmp_path / "m")
    assert loaded.ingest_config == ingest
    assert loaded.threshold == 0.37
    assert loaded.device_uid == art.device_uid
    meta = json.loads((tmp_path / "m" / "ctcovid.json").read_text())
    assert meta["classes"] == {"positive": "covid", "negative": "non-covid"}
    x = np.random.default_rng(2).integers(0, 255, (4, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(model.predict_on_batch(x), tiny.predict_on_batch(x), atol=1e-6)


def test_device_uid_changes_with_the_weights(tiny, tmp_path):
    first = save_model(
        tiny, ModelArtifact(ModelConfig(input_size=32), IngestConfig()), tmp_path / "a"
    )
    dense = tiny.get_layer("p_covid")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + 1.0])
    try:
        second = save_model(
            tiny, ModelArtifact(ModelConfig(input_size=32), IngestConfig()), tmp_path / "b"
        )
    finally:
        dense.set_weights([kernel, bias])
    assert first.device_uid != second.device_uid


def test_tampered_weights_are_refused(tiny, tmp_path):
    save_model(tiny, ModelArtifact(ModelConfig(input_size=32), IngestConfig()), tmp_path / "m")
    meta_path = tmp_path / "m" / "ctcovid.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="sha256 differs"):
        load_model(tmp_path / "m")


def test_missing_model_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelError, match="ctcovid train"):
        read_artifact(tmp_path / "nowhere")


JAX_SCRIPT = """
import sys, numpy as np
from ctcovid.model.artifact import load_model
model, _ = load_model(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(model.predict_on_batch(x)))
"""


def test_jax_backend_gives_the_same_probabilities(tiny, tmp_path):
    pytest.importorskip("jax")
    save_model(tiny, ModelArtifact(ModelConfig(input_size=32), IngestConfig()), tmp_path / "m")
    x = np.random.default_rng(3).integers(0, 255, (4, 32, 32, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KERAS_BACKEND="jax")
    subprocess.run(
        [
            sys.executable,
            "-c",
            JAX_SCRIPT,
            str(tmp_path / "m"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny.predict_on_batch(x), atol=1e-4)


def test_model_config_is_validated():
    from ctcovid.errors import ConfigError

    with pytest.raises(ConfigError, match="dropout"):
        replace(ModelConfig(), dropout=1.5)
