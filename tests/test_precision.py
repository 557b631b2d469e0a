"""Results stated at a fixed precision, scores that do not depend on the company a series keeps.

The same series through ``classify`` and batch, at any batch size and any number of workers,
gives the same bytes of probability and so the same SR; the label and the key slices follow the
stated (rounded) values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctcovid.batch import BatchOptions, run_batch
from ctcovid.batch.results import CLASSIFIED, RESULTS_FILE, read_results
from ctcovid.dicom.series import load_series
from ctcovid.inference import SCORING_BATCH_SIZE, Classifier
from ctcovid.report import build_sr
from ctcovid.scans import (
    PROBABILITY_QUANTUM,
    key_slice_order,
    prepare_scan,
    scan_label,
    stated_probability,
)

SIZE = 64
# More slices than one scoring batch, and not a multiple of it: the last batch is padded.
N_SLICES = (40, 23)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dicom_fixtures import StudySpec, write_study

    root = tmp_path_factory.mktemp("precision")
    for index, n in enumerate(N_SLICES):
        write_study(
            root / f"study{index}",
            StudySpec(positive=index == 0, n_slices=n, size=SIZE),
            seed=23,
            index=index,
        )
    return root


@pytest.fixture(scope="module")
def classifier(tiny_classifier) -> Classifier:
    """The tiny model, loaded once for the session: loading is most of a small run's time."""
    return Classifier(tiny_classifier.model, tiny_classifier.artifact)


def _classify(
    classifier: Classifier, archive: Path, batch_size: int
) -> dict[str, tuple[dict, str]]:
    """Per series: the result's JSON probabilities and the SR's SOP Instance UID, with the
    classifier's ``batch_size`` set as ``--batch-size`` would set it."""
    classifier.batch_size = batch_size
    out = {}
    for ct_dir in sorted({p.parent for p in archive.rglob("*.dcm")}):
        series = load_series(ct_dir, classifier.ingest_config)
        _, result = classifier.run(series)
        d = result.to_json_dict()
        numbers = {k: d[k] for k in ("probability_covid", "probability_covid_raw", "label")}
        numbers["slice_probabilities"] = d["slice_probabilities"]
        out[result.series_instance_uid] = (numbers, str(build_sr(result, series).SOPInstanceUID))
    return out


def test_the_series_are_longer_than_one_scoring_batch() -> None:
    assert max(N_SLICES) > SCORING_BATCH_SIZE and min(N_SLICES) % SCORING_BATCH_SIZE


def test_classify_gives_the_same_bytes_and_sr_at_batch_sizes_1_7_and_32(
    classifier: Classifier, archive: Path
) -> None:
    runs = {size: _classify(classifier, archive, size) for size in (1, 7, 32)}
    assert len(runs[32]) == len(N_SLICES)
    assert runs[1] == runs[32]
    assert runs[7] == runs[32]


def test_batch_with_1_and_2_workers_and_any_batch_size_matches_classify(
    classifier: Classifier, tiny_model_dir: Path, archive: Path, tmp_path: Path
) -> None:
    expected = _classify(classifier, archive, 32)
    for workers, batch_size in ((1, 7), (2, 32)):
        out = tmp_path / f"w{workers}b{batch_size}"
        classifier.batch_size = batch_size
        run_batch(
            BatchOptions(archive, out, tiny_model_dir, workers=workers, batch_size=batch_size),
            classifier=classifier,
        )
        rows = [r for r in read_results(out / RESULTS_FILE) if r.status == CLASSIFIED]
        assert len(rows) == len(expected)
        for row in rows:
            numbers, sr_uid = expected[row.series_instance_uid]
            assert row.probability_covid == numbers["probability_covid"]
            assert row.label == numbers["label"]
            assert Path(row.sr_path).name == f"{sr_uid}.dcm", (workers, batch_size)


def test_a_slice_scores_the_same_alone_and_amid_other_series(
    classifier: Classifier, archive: Path
) -> None:
    """What shares a model call with a series is its own slices and blank padding only."""
    ct_dir = sorted({p.parent for p in archive.rglob("*.dcm")})[0]
    config = classifier.ingest_config
    slices = prepare_scan(load_series(ct_dir, config), config).used.slices
    whole = classifier.predict_slices(slices)
    head = classifier.predict_slices(slices[:SCORING_BATCH_SIZE])
    assert whole.tobytes()[: head.nbytes] == head.tobytes()


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-PROBABILITY_QUANTUM / 2, "non-covid"),  # 0.4995 is 0.49949999... in binary: 0.499
        (-0.4 * PROBABILITY_QUANTUM, "covid"),  # below the threshold raw, 0.500 stated
        (PROBABILITY_QUANTUM / 2, "covid"),
        (-0.6 * PROBABILITY_QUANTUM, "non-covid"),
    ],
)
def test_the_label_follows_the_stated_probability(offset: float, expected: str) -> None:
    threshold = 0.5
    p = threshold + offset
    label = scan_label(
        p,
        threshold=threshold,
        classes=("covid", "non-covid"),
        n_slices_total=10,
        n_slices_lost=0,
        max_lost_fraction=0.1,
    )
    assert label == expected
    assert (label == "covid") == (stated_probability(p) >= threshold)


def test_probabilities_are_stated_to_the_quantum() -> None:
    assert PROBABILITY_QUANTUM == 0.001
    assert stated_probability(0.98229694366455) == 0.982
    assert stated_probability(np.float32(0.9822967)) == 0.982


def test_key_slices_rank_stated_values_ties_by_index() -> None:
    # 0.7004 and 0.7001 are both 0.700 stated; 0.9 first, then the tie in slice order.
    assert key_slice_order([0.7004, 0.2, 0.9, 0.7001, 0.7]) == [2, 0, 3, 4, 1]
