"""The fast paths give the plain paths' answers: threaded ingest, preferred decoders, streaming
classification. Tolerances: ingest within 1 grey level (float32 vs float64 rounding at .5),
probabilities within 1e-5 (same model, same float32 arithmetic, other batching).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from ctcovid.config import IngestConfig
from ctcovid.dicom import load_series
from ctcovid.preprocess import iter_windowed, lung_window, preprocess_series

SIZE = 32


def plain_loop(files: list[Path], config: IngestConfig) -> np.ndarray:
    """The reference: one file at a time, pydicom's modality LUT in float64, block mean."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        hu = apply_modality_lut(ds.pixel_array, ds)
        windowed = lung_window(hu, config.window_center_hu, config.window_width_hu)
        k = windowed.shape[0] // config.image_size
        small = windowed.astype(np.float64).reshape(config.image_size, k, config.image_size, k)
        out.append(np.rint(small.mean(axis=(1, 3))).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def series_by_syntax(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 64 px phantom written in several transfer syntaxes (same seed, same pixels)."""
    from dicom_fixtures import StudySpec, available_transfer_syntaxes, write_study

    root = tmp_path_factory.mktemp("syntaxes")
    out = {}
    for ts in ("explicit", "rle", "jpegls"):
        if ts not in available_transfer_syntaxes():
            continue
        spec = StudySpec(positive=True, n_slices=10, size=64, transfer_syntax=ts)
        out[ts] = write_study(root / ts, spec, seed=3).ct_dir
    return out


def test_threaded_ingest_matches_plain_per_file_loop(series_by_syntax: dict[str, Path]) -> None:
    config = IngestConfig(image_size=SIZE, min_slices=4)
    series = load_series(series_by_syntax["explicit"], config)
    fast = preprocess_series(series, config)
    plain = plain_loop([ref.instance.path for ref in series.slices], config)
    diff = np.abs(fast.slices.astype(int) - plain.astype(int))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99


@pytest.mark.parametrize("syntax", ["rle", "jpegls"])
def test_compressed_series_decode_to_the_same_slices(
    series_by_syntax: dict[str, Path], syntax: str
) -> None:
    if syntax not in series_by_syntax:
        pytest.skip(f"no {syntax} encoder installed to write the fixture")
    config = IngestConfig(image_size=SIZE, min_slices=4)
    native = preprocess_series(load_series(series_by_syntax["explicit"], config), config)
    compressed = preprocess_series(load_series(series_by_syntax[syntax], config), config)
    np.testing.assert_array_equal(compressed.slices, native.slices)


def test_worker_count_does_not_change_slices_or_their_order(
    series_by_syntax: dict[str, Path],
) -> None:
    config = IngestConfig(image_size=SIZE, min_slices=4)
    series = load_series(series_by_syntax["explicit"], config)
    one = preprocess_series(series, config, workers=1)
    many = preprocess_series(series, config, workers=4)
    np.testing.assert_array_equal(many.slices, one.slices)
    assert many.sop_instance_uids == one.sop_instance_uids


def test_undecodable_file_is_skipped_with_its_reason(
    series_by_syntax: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    config = IngestConfig(image_size=SIZE, min_slices=4)
    folder = tmp_path / "ct"
    shutil.copytree(series_by_syntax["explicit"], folder)
    series = load_series(folder, config)
    broken = series.slices[3].instance.path
    broken.write_bytes(broken.read_bytes()[:-2000])  # header intact, pixel data cut short
    errors: list[str] = []
    kept = [ref for ref, _ in iter_windowed(series.slices, config, errors, workers=3)]
    assert len(kept) == series.n_slices - 1
    assert len(errors) == 1 and str(broken) in errors[0]


def test_streaming_classify_equals_plain_model_predict(
    tiny_classifier, studies_root: Path, study_infos: list
) -> None:
    from ctcovid.inference import Classifier

    # The session's loaded tiny model (conftest), decoding 5 slices ahead: 12 slices: 5 + 5 + 2.
    classifier = Classifier(tiny_classifier.model, tiny_classifier.artifact, batch_size=5)
    ct_dir = studies_root / study_infos[0]["study_dir"] / "ct"
    series = load_series(ct_dir, classifier.ingest_config)
    prepared, result = classifier.run(series)
    plain = classifier.model.predict(
        prepared.used.slices[..., np.newaxis].astype(np.float32), batch_size=32, verbose=0
    ).reshape(-1)
    np.testing.assert_allclose(result.slice_probabilities, plain, atol=1e-5)
    assert result.n_slices_used == series.n_slices
    assert result.probability_covid_raw == pytest.approx(float(np.mean(plain)), abs=1e-5)
    assert result.probability_covid == round(result.probability_covid_raw, 3)


def test_lung_policy_classifies_from_the_whole_series(
    tiny_classifier, studies_root: Path, study_infos: list
) -> None:
    from ctcovid.inference import Classifier
    from ctcovid.preprocess import select_slices

    artifact = tiny_classifier.artifact
    classifier = Classifier(
        tiny_classifier.model,
        replace(
            artifact,
            ingest_config=replace(artifact.ingest_config, slice_policy="lung", max_slices=6),
        ),
    )
    ct_dir = studies_root / study_infos[1]["study_dir"] / "ct"
    series = load_series(ct_dir, classifier.ingest_config)
    prepared, result = classifier.run(series)
    indices, _ = select_slices(prepared.all_slices.slices, classifier.ingest_config)
    assert result.n_slices_used == len(indices) <= 6
    expected = classifier.predict_slices(prepared.all_slices.slices[indices])
    np.testing.assert_allclose(result.slice_probabilities, expected, atol=1e-6)
