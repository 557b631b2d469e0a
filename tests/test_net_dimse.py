"""The PACS client (``ctcovid.net.dimse``) held to the listener's standard, on real associations
on 127.0.0.1: deadlines, bounded memory, a C-MOVE receiver that takes only what was announced,
partial retrievals reported as such, C-FIND identifiers that say what they mean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dimse_peers import PACS_AET, FakePacs, StallingProxy, ct_instance, stalling_server
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from ctcovid.errors import ConfigError, PacsError
from ctcovid.net import SeriesMatch
from ctcovid.net.dimse import DimseArchive, MoveReceiver
from ctcovid.net.peers import Peer
from ctcovid.net.query import IncompleteRetrievalError
from ctcovid.net.services import LOSSY_TRANSFER_SYNTAXES

pytestmark = pytest.mark.network

OUR_AET = "CTCOVIDT"
# Far beyond every deadline the tests set: reaching it means the client hung.
HANG_SECONDS = 45.0
STUDY, SERIES = generate_uid(), generate_uid()


def within(fn: Callable[[], Any], seconds: float = HANG_SECONDS) -> Any:
    """``fn()``'s result or exception; fails the test if it has not returned in ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds:.0f} s: the call hangs")
    if "error" in box:
        raise box["error"]
    return box["value"]


def archive(port: int, **kwargs: Any) -> DimseArchive:
    return DimseArchive(Peer("127.0.0.1", port, PACS_AET), calling_ae_title=OUR_AET, **kwargs)


def series_match() -> SeriesMatch:
    return SeriesMatch(STUDY, SERIES, modality="CT")


class Collected:
    """An instance writer that keeps the SOP Instance UIDs and sizes it was given."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def __call__(self, sop_instance_uid: str, data: bytes | Path) -> None:
        self.sizes[sop_instance_uid] = (
            data.stat().st_size if isinstance(data, Path) else len(data)
        )


@pytest.fixture
def three_instances() -> list:
    return [ct_instance(STUDY, SERIES) for _ in range(3)]


# -- 1. deadlines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["partial", "trickle"])
def test_find_studies_ends_at_the_deadline_when_the_pacs_stalls_in_a_pdu(mode: str) -> None:
    port, stop = stalling_server(mode)
    try:
        client = archive(port, timeout_seconds=2)
        with pytest.raises(PacsError, match=f"127.0.0.1:{port}:PACS.*stalled"):
            within(lambda: client.find_studies({"PatientID": "P1"}))
    finally:
        stop.set()


@pytest.mark.parametrize("mode", ["partial", "trickle"])
def test_c_get_ends_at_the_deadline_when_the_pacs_stalls_mid_retrieval(
    mode: str, three_instances: list
) -> None:
    pacs = FakePacs(three_instances)
    # Connection 0 is the image-level C-FIND; on the C-GET's, the A-ASSOCIATE-AC passes and
    # the first PDU after it (a C-STORE request) stalls.
    proxy = StallingProxy(pacs.port, stall_connection=1, pass_pdus=1, mode=mode)
    try:
        client = archive(proxy.port, timeout_seconds=2)
        with pytest.raises(PacsError, match=f"C-GET retrieval of series {SERIES}.*stalled"):
            within(lambda: client.retrieve_series(series_match(), Collected()))
    finally:
        proxy.close()
        pacs.close()


def test_an_association_that_keeps_answering_is_aborted_at_its_deadline() -> None:
    # Every PDU arrives whole and in time, without end: only the overall deadline stops it.
    pacs = FakePacs([ct_instance(STUDY, SERIES)], pending_every_seconds=0.2)
    try:
        client = archive(pacs.port, timeout_seconds=5, deadline_seconds=3)
        with pytest.raises(PacsError, match=r"C-FIND studies .* passed its deadline of 3 s"):
            within(lambda: client.find_studies({"PatientID": "P1"}))
    finally:
        pacs.close()


# -- 2. memory ------------------------------------------------------------------------------------

RSS_CLIENT = """
import json, resource, sys
from pathlib import Path
from ctcovid.errors import CtCovidError
from ctcovid.net import SeriesCache, SeriesMatch
from ctcovid.net.dimse import DimseArchive
from ctcovid.net.peers import Peer

port, study, series, root = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
cache = SeriesCache(root / "cache", bound_bytes=1_000_000)
client = DimseArchive(Peer("127.0.0.1", port, "PACS"), calling_ae_title="CTCOVIDT",
                      timeout_seconds=30, spool_dir=root / "spool")
match = SeriesMatch(study, series, modality="CT")
client.find_instances(match)  # every library path warmed up before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    client.retrieve_series(match, lambda uid, data: cache.write(match.key, uid, data))
    error = ""
except CtCovidError as exc:
    error = f"{type(exc).__name__}: {exc}"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "error": error, "used": cache.used_bytes}))
"""


def test_a_96_mib_instance_against_a_1_mb_cache_keeps_client_memory_bounded(
    tmp_path: Path,
) -> None:
    big = ct_instance(STUDY, SERIES, pixel_bytes=96 * 1024 * 1024)
    pacs = FakePacs([big])
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(RSS_CLIENT))
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(pacs.port), STUDY, SERIES, str(tmp_path)],
            capture_output=True, text=True, timeout=300, check=False,
        )
    finally:
        pacs.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"].startswith("CacheFullError"), report
    assert report["used"] == 0
    bound_kib, overhead_kib = 1_000_000 // 1024, 32 * 1024
    assert report["growth_kib"] < 2 * bound_kib + overhead_kib, report


# -- 3. the C-MOVE receiver -----------------------------------------------------------------------


def _store(port: int, calling: str, ds) -> tuple[bool, int | None]:
    """C-STORE ``ds`` to the receiver as ``calling``: (association accepted, status)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AET)
    if not assoc.is_established:
        return False, None
    try:
        status = assoc.send_c_store(ds)
        return True, int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def test_the_move_receiver_refuses_an_association_from_a_third_ae(tmp_path: Path) -> None:
    receiver = MoveReceiver(OUR_AET, 0, host="127.0.0.1", allow_ae_titles=(PACS_AET,))
    try:
        accepted, _ = within(lambda: _store(receiver.port, "INTRUDER", ct_instance(STUDY, SERIES)))
    finally:
        receiver.close()
    assert accepted is False


def test_the_move_receiver_stores_only_instances_the_c_find_announced() -> None:
    announced = [ct_instance(STUDY, SERIES) for _ in range(2)]
    injected = ct_instance(STUDY, SERIES)  # same series, never announced
    pacs = FakePacs(announced, delivered=[*announced, injected])
    receiver = MoveReceiver(OUR_AET, 0, host="127.0.0.1", allow_ae_titles=(PACS_AET,))
    pacs.move_destination = ("127.0.0.1", receiver.port)
    written = Collected()
    try:
        client = archive(pacs.port, timeout_seconds=10, move_receiver=receiver)
        n = within(lambda: client.retrieve_series(series_match(), written))
    finally:
        receiver.close()
        pacs.close()
    assert set(written.sizes) == {ds.SOPInstanceUID for ds in announced}
    assert n == 2


# -- 4. partial retrievals ------------------------------------------------------------------------


def test_a_retrieval_missing_an_announced_instance_is_incomplete(three_instances: list) -> None:
    pacs = FakePacs(three_instances, delivered=three_instances[:2])
    try:
        client = archive(pacs.port, timeout_seconds=10)
        with pytest.raises(IncompleteRetrievalError, match="delivered 2 of the 3") as caught:
            within(lambda: client.retrieve_series(series_match(), Collected()))
    finally:
        pacs.close()
    assert (caught.value.delivered, caught.value.announced) == (2, 3)


def test_a_c_get_ending_in_warning_is_not_complete(three_instances: list) -> None:
    pacs = FakePacs(three_instances, final_status=0xB000)
    try:
        client = archive(pacs.port, timeout_seconds=10)
        with pytest.raises(IncompleteRetrievalError, match="final status 0xB000"):
            within(lambda: client.retrieve_series(series_match(), Collected()))
    finally:
        pacs.close()


# -- 5. C-FIND identifiers ------------------------------------------------------------------------


def test_c_find_declares_utf8_when_a_value_is_not_ascii() -> None:
    pacs = FakePacs([ct_instance(STUDY, SERIES)])
    try:
        within(lambda: archive(pacs.port).find_studies({"PatientName": "Müller^Jörg"}))
    finally:
        pacs.close()
    (query,) = pacs.queries
    assert query.SpecificCharacterSet == "ISO_IR 192"
    assert str(query.PatientName) == "Müller^Jörg"


def test_an_empty_query_value_is_refused_naming_the_key() -> None:
    pacs = FakePacs([ct_instance(STUDY, SERIES)])
    try:
        with pytest.raises(ConfigError, match="StudyDate has an empty value"):
            within(lambda: archive(pacs.port).find_studies({"StudyDate": ""}))
    finally:
        pacs.close()
    assert pacs.queries == []  # nothing was asked of the PACS


# -- 7. transfer syntaxes -------------------------------------------------------------------------


def test_c_get_offers_lossless_syntaxes_in_a_context_of_their_own() -> None:
    pacs = FakePacs([ct_instance(STUDY, SERIES)])
    try:
        within(lambda: archive(pacs.port).retrieve_series(series_match(), Collected()))
    finally:
        pacs.close()
    ct = [syntaxes for uid, syntaxes in pacs.get_contexts if uid == CTImageStorage]
    assert ct[0] and not set(ct[0]) & LOSSY_TRANSFER_SYNTAXES
    assert all(set(s) <= LOSSY_TRANSFER_SYNTAXES for s in ct[1:])


# -- 6. TLS on the batch's DIMSE path -------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "pacs.pem", folder / "pacs.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_batch_from_pacs_queries_over_tls_with_the_tls_options(tmp_path: Path) -> None:
    import ssl

    from ctcovid.cli.batch_pacs import pacs_source
    from ctcovid.net.tls import server_ssl_context

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = _self_signed(tmp_path)
    server_tls = server_ssl_context(cert=cert, key=key)
    assert isinstance(server_tls, ssl.SSLContext)
    pacs = FakePacs([ct_instance(STUDY, SERIES)], ssl_context=server_tls)
    options: dict[str, Any] = dict(
        from_pacs=f"127.0.0.1:{pacs.port}:{PACS_AET}", from_dicomweb=None, query=None,
        modality=None, accessions=None, body_part=None, series_description=None,
        cache_gb=1.0, max_retrievals=1, query_pause=0.0, ae_title=OUR_AET, move_port=None,
        auth_file=None, ca_file=None,
    )
    try:
        source = pacs_source(**options, tls_ca=cert)
        assert source is not None
        studies = within(lambda: source.archive.find_studies({"PatientID": "P1"}))
    finally:
        pacs.close()
    assert [s.study_instance_uid for s in studies] == [STUDY]


# -- the batch over such a PACS: a row per series, and the run finishes -----------------------


@pytest.fixture(scope="module")
def classifier(tiny_classifier) -> Any:
    """The tiny model, loaded once for the session, for the batch runs of this module."""
    from ctcovid.inference import Classifier

    return Classifier(tiny_classifier.model, tiny_classifier.artifact)


def _batch_rows(
    port: int, out: Path, model: Path, classifier: Any, **archive_kwargs: Any
) -> dict[str, Any]:
    from ctcovid.batch import RESULTS_FILE, BatchOptions, read_results, run_batch
    from ctcovid.batch.sources import PacsSource
    from ctcovid.net.query import SeriesRules, StudyQuery

    source = PacsSource(archive(port, **archive_kwargs), StudyQuery(), SeriesRules(),
                        cache_bytes=10**8, pause_seconds=0.0)  # fmt: skip
    try:
        run_batch(BatchOptions(out / "cache", out, model, workers=0, source=source),
                  classifier=classifier)  # fmt: skip
    finally:
        source.close()
    return {r.series_instance_uid: r for r in read_results(out / RESULTS_FILE)}


def test_a_batch_rows_a_partly_delivered_series_incomplete_with_the_counts(
    three_instances: list, tiny_model_dir: Path, classifier: Any, tmp_path: Path
) -> None:
    pacs = FakePacs(three_instances, delivered=three_instances[:2])
    try:
        rows = within(lambda: _batch_rows(pacs.port, tmp_path / "run", tiny_model_dir,
                                          classifier, timeout_seconds=10), 120)  # fmt: skip
    finally:
        pacs.close()
    row = rows[SERIES]
    assert row.status == "incomplete"
    assert "delivered 2 of the 3" in row.reason and row.sr_path == ""


def test_a_batch_whose_pacs_stalls_mid_retrieval_rows_the_series_failed_and_finishes(
    three_instances: list, tiny_model_dir: Path, classifier: Any, tmp_path: Path
) -> None:
    pacs = FakePacs(three_instances)
    # Connections: study C-FIND, series C-FIND, image C-FIND, then the C-GET, which stalls.
    proxy = StallingProxy(pacs.port, stall_connection=3, pass_pdus=1, mode="trickle")
    try:
        rows = within(lambda: _batch_rows(proxy.port, tmp_path / "run", tiny_model_dir,
                                          classifier, timeout_seconds=2), 120)  # fmt: skip
    finally:
        proxy.close()
        pacs.close()
    row = rows[SERIES]
    assert row.status == "failed"
    assert "stalled" in row.reason and SERIES in row.reason
