"""The node's worker decodes the next waiting series while the model scores the current one.

Real store, real decoder process, real (tiny) model; a worker with ``prefetch = false`` is the
reference every result is compared with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import pytest
from node_helpers import ct_files, put, run_until_idle

from ctcovid.node.config import NodeConfig
from ctcovid.node.jobs import CLASSIFIED, FAILED, IGNORED, UNUSABLE, WAITING, SeriesRecord
from ctcovid.node.store import Store
from ctcovid.node.worker import Worker


def make_worker(store: Path, classifier, **settings) -> Worker:
    config = NodeConfig(store=store, stable_seconds=0, retry_seconds=0, min_free_mb=0, **settings)
    return Worker(config, Store(config.store), classifier)


def put_all(worker: Worker, files: list[Path], **kwargs) -> None:
    for path in files:
        put(worker.store, path, **kwargs)


def by_series(worker: Worker) -> dict[str, SeriesRecord]:
    return {r.series_instance_uid: r for r in worker.store.jobs.list_series()}


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(event)]


@pytest.fixture(autouse=True)
def _worker_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ctcovid.node.worker")


def test_two_series_are_scored_exactly_as_without_prefetch(
    tmp_path: Path, studies_root: Path, classifier, caplog: pytest.LogCaptureFixture
):
    results = {}
    for prefetch in (True, False):
        worker = make_worker(tmp_path / f"store-{prefetch}", classifier, prefetch=prefetch)
        put_all(worker, ct_files(studies_root, "study_000"))
        put_all(worker, ct_files(studies_root, "study_001"))
        run_until_idle(worker)
        worker.close()
        results[prefetch] = by_series(worker)

    assert results[True].keys() == results[False].keys() and len(results[True]) == 2
    for uid, ahead in results[True].items():
        alone = results[False][uid]
        assert ahead.state == alone.state == CLASSIFIED
        assert ahead.slice_probabilities == alone.slice_probabilities  # the JSON, as stored
        assert ahead.sr_sop_instance_uid == alone.sr_sop_instance_uid
    second = max(results[True].values(), key=lambda r: r.first_received)
    # The second series was decoded while the first was scored, and that decode was used.
    assert any(second.series_instance_uid in m for m in events(caplog, "event=prefetch_started"))
    assert any(second.series_instance_uid in m for m in events(caplog, "event=prefetch_used"))


def test_a_series_that_changes_after_its_prefetch_began_is_classified_on_all_its_instances(
    tmp_path: Path, studies_root: Path, classifier, caplog: pytest.LogCaptureFixture
):
    worker = make_worker(tmp_path / "store", classifier)
    later = ct_files(studies_root, "study_001")
    put_all(worker, ct_files(studies_root, "study_000"))
    put_all(worker, later[:-1])
    assert worker.step()  # the first series scored, the second decoded ahead without its last
    assert len(events(caplog, "event=prefetch_started")) == 1
    put(worker.store, later[-1])  # arrives after that decode began

    run_until_idle(worker)
    worker.close()

    reference = make_worker(tmp_path / "reference", classifier, prefetch=False)
    put_all(reference, later)
    run_until_idle(reference)
    reference.close()
    ((uid, expected),) = by_series(reference).items()
    got = by_series(worker)[uid]
    assert (got.state, got.n_instances) == (CLASSIFIED, len(later))
    assert got.slice_probabilities == expected.slice_probabilities
    assert got.sr_sop_instance_uid == expected.sr_sop_instance_uid
    assert any("reason=series_changed" in m for m in events(caplog, "event=prefetch_dropped"))


def test_stopping_with_a_series_decoded_ahead_leaves_it_waiting_for_the_next_worker(
    tmp_path: Path, studies_root: Path, classifier, caplog: pytest.LogCaptureFixture
):
    worker = make_worker(tmp_path / "store", classifier)
    put_all(worker, ct_files(studies_root, "study_000"))
    put_all(worker, ct_files(studies_root, "study_001"))
    steps: list[int] = []
    decoders: list[int] = []
    niceness: list[int] = []

    def one_step() -> bool:  # the stop comes while the first series is being finished
        if steps and worker._decoder is not None and worker._decoder._executor is not None:
            decoders.extend(worker._decoder._executor._processes)
            niceness.extend(os.getpriority(os.PRIO_PROCESS, pid) for pid in decoders)
        steps.append(1)
        return len(steps) == 1

    worker.run(threading.Event(), one_step)

    first, second = sorted(by_series(worker).values(), key=lambda r: r.first_received)
    assert first.state == CLASSIFIED
    assert second.state == WAITING and second.classify_attempts == 0
    history = worker.store.jobs.history(second.series_instance_uid, second.study_instance_uid)
    assert "classifying" not in [h["state"] for h in history]  # never claimed
    assert events(caplog, "event=prefetch_abandoned")
    assert decoders
    # Decoding ahead yields the CPU to the model's scoring.
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness and all(n >= min(ours + 1, 19) for n in niceness)  # 19: the lowest there is
    for pid in decoders:  # the decode in flight was ended, not waited for
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    following = Worker(worker.config, Store(worker.config.store), classifier)
    run_until_idle(following)
    following.close()
    record = by_series(following)[second.series_instance_uid]
    assert (record.state, record.classify_attempts) == (CLASSIFIED, 1)


def test_a_series_decoded_ahead_that_fails_to_decode_fails_as_without_prefetch(
    tmp_path: Path, studies_root: Path, classifier, caplog: pytest.LogCaptureFixture
):
    """A bomb whose header the ingest lets through (its size limits raised, as in the
    decoder's own memory-limit test), so that only the decoder's allocation stops it."""
    from bombs import write_bomb_series

    from ctcovid.inference import Classifier

    unbounded = dataclasses.replace(classifier.ingest_config, max_rows_columns=65535)
    artifact = dataclasses.replace(classifier.artifact, ingest_config=unbounded)
    classifier = Classifier(classifier.model, artifact)
    bomb_uid = write_bomb_series(ct_files(studies_root, "study_001"), tmp_path / "bomb")
    outcomes = {}
    for prefetch in (True, False):
        worker = make_worker(
            tmp_path / f"store-{prefetch}", classifier, prefetch=prefetch, decoder_memory_mb=1536
        )
        put_all(worker, ct_files(studies_root, "study_000"))
        put_all(worker, sorted((tmp_path / "bomb").iterdir()))
        run_until_idle(worker)
        worker.close()
        root = str(worker.store.root)  # reasons name the file: compare them store-relative
        outcomes[prefetch] = {
            u: (r.state, r.reason.replace(root, "STORE")) for u, r in by_series(worker).items()
        }

    assert outcomes[True] == outcomes[False]
    state, reason = outcomes[True][bomb_uid]
    assert state in (FAILED, UNUSABLE) and "allocate" in reason  # the decoder's reason
    assert any(bomb_uid in m for m in events(caplog, "event=prefetch_started"))


def test_a_series_its_rule_ignores_is_never_decoded_ahead(
    tmp_path: Path, studies_root: Path, classifier, caplog: pytest.LogCaptureFixture
):
    rules = (
        {"name": "scouts", "action": "ignore", "when": {"CallingAETitle": "SCOUTS"}},
        {"name": "all"},
    )
    worker = make_worker(tmp_path / "store", classifier, rule=rules)
    put_all(worker, ct_files(studies_root, "study_000"))
    put_all(worker, ct_files(studies_root, "study_001"), calling_aet="SCOUTS")

    run_until_idle(worker)
    worker.close()

    states = sorted((r.first_received, r.state) for r in by_series(worker).values())
    assert [s for _, s in states] == [CLASSIFIED, IGNORED]
    assert not events(caplog, "event=prefetch_started")
