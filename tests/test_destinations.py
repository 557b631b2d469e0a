"""Several named destinations ([destination.NAME]): each (series, destination) its own delivery
job; a dead destination delays no other; kill -9 mid-send leaves one SR per destination."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import ct_files, free_port, put, run_until_idle, wait_for
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage
from typer.testing import CliRunner

from ctcovid.cli.main import app
from ctcovid.errors import ConfigError
from ctcovid.node.config import NodeConfig, load_config
from ctcovid.node.jobs import DeliveryState
from ctcovid.node.store import Store
from ctcovid.node.worker import Worker

pytestmark = pytest.mark.network


class SrPeer:
    """An SR storage SCP on a fixed loopback port that records each SOP Instance UID it is
    given; ``stall`` holds the C-STORE unanswered until released (a peer that hangs)."""

    def __init__(self, port: int, *, stall: bool = False) -> None:
        self.port = port
        self.received: list[str] = []
        self.release = threading.Event()
        self.stall = stall
        ae = AE(ae_title="PEER")
        ae.add_supported_context(Comprehensive3DSRStorage)
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 120
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle)]
        )

    def _handle(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        if self.stall:
            self.release.wait(60)
        return 0x0000

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def peers() -> Iterator[list[SrPeer]]:
    started: list[SrPeer] = []
    yield started
    for peer in started:
        peer.close()


def _config(tmp_path: Path, pacs_port: int, research_port: int, **settings) -> NodeConfig:
    return NodeConfig(
        store=tmp_path / "store", stable_seconds=0, retry_seconds=0.5, min_free_mb=0,
        max_attempts=50, network_timeout_seconds=5,
        destination={
            "pacs": {"kind": "dicom", "peer": f"127.0.0.1:{pacs_port}:PEER"},
            "research": {"kind": "dicom", "peer": f"127.0.0.1:{research_port}:PEER"},
        },
        **settings,
    )


def _by_destination(worker: Worker):
    return {d.destination: d for d in worker.store.jobs.deliveries()}


def test_destination_tables_are_read_and_bad_ones_refused_naming_the_key(tmp_path: Path):
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[node]\nstore = "s"\n\n'
        '[destination.pacs]\nkind = "dicom"\npeer = "pacs.example.org:104:PACS"\n\n'
        '[destination.vna]\nkind = "stow"\nurl = "https://vna.example.org/dicom-web/"\n'
        'auth_file = "vna.auth"\n'
    )
    (tmp_path / "vna.auth").write_text("Bearer abc\n")
    (tmp_path / "vna.auth").chmod(0o600)
    config = load_config(toml, {})
    assert [(d.name, d.kind, d.address) for d in config.destinations] == [
        ("pacs", "dicom", "pacs.example.org:104:PACS"),
        ("vna", "stow", "https://vna.example.org/dicom-web"),
    ]
    assert config.destination_names == ("pacs", "vna")
    assert config.destinations[1].settings.stow_auth is not None  # relative to the file

    def refused(table: dict, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            NodeConfig(store=tmp_path, destination={"x": table} if "name" not in table
                       else {table.pop("name"): table})

    refused({"kind": "ftp"}, r"destination\.x\.kind")
    refused({"kind": "dicom"}, r"destination\.x\.peer: required")
    refused({"kind": "dicom", "peer": "nowhere"}, r"destination\.x\.peer")
    refused({"kind": "dicom", "peer": "h:104:A", "url": "u"}, r"unknown key\(s\) url")
    refused({"kind": "stow", "url": "https://u:p@vna/"}, r"destination\.x\.url must not carry")
    refused({"name": "default", "kind": "dicom", "peer": "h:104:A"}, "peer or stow")
    with pytest.raises(ConfigError, match=r"rule\[0\]\.destinations: no destination named pcs"):
        NodeConfig(store=tmp_path, destination={"pacs": {"kind": "dicom", "peer": "h:104:A"}},
                   rule=({"name": "all", "destinations": ["pcs"]},))


def test_a_dead_destination_delays_no_other_and_gets_its_sr_when_back(
    tmp_path: Path, studies_root: Path, classifier, peers: list[SrPeer]
):
    pacs_port, research_port = free_port(), free_port()
    peers.append(SrPeer(pacs_port))
    worker = Worker(_config(tmp_path, pacs_port, research_port), Store(tmp_path / "store"),
                    classifier)
    for path in ct_files(studies_root, "study_001"):
        put(worker.store, path)

    run_until_idle(worker)

    (record,) = worker.store.jobs.list_series()
    deliveries = _by_destination(worker)
    assert deliveries["pacs"].state == DeliveryState.SENT
    assert peers[0].received == [record.sr_sop_instance_uid]  # at once, research down
    research = deliveries["research"]
    assert research.state == DeliveryState.PENDING and research.attempts >= 1
    assert "research" not in research.reason and research.reason  # why, not who

    # `ctcovid queue` shows each destination's state.
    shown = CliRunner().invoke(app, ["queue", "--store", str(worker.store.root), "--json"])
    assert shown.exit_code == 0, shown.output
    (series,) = json.loads(shown.output)["series"]
    listed = {d["destination"]: d["state"] for d in series["deliveries"]}
    assert listed == {"pacs": "sent", "research": "pending"}

    peers.append(SrPeer(research_port))  # the research PACS comes back
    wait_for(lambda: worker.step() or _by_destination(worker)["research"].state == "sent",
             60, "the research SR to be delivered", interval=0.2)
    assert _by_destination(worker)["research"].state == DeliveryState.SENT
    assert peers[1].received == [record.sr_sop_instance_uid]
    assert peers[0].received == [record.sr_sop_instance_uid]  # not again
    worker.close()
    worker.store.close()


_SEND_DUE = """
import json, sys
from ctcovid.node.config import NodeConfig
from ctcovid.node.courier import couriers
from ctcovid.node.store import Store
config = NodeConfig.from_dict(json.loads(sys.argv[1]))
for courier in couriers(config, Store(config.store)):
    courier.send_due()
"""


def test_kill_9_mid_send_leaves_one_sr_per_destination(
    tmp_path: Path, studies_root: Path, classifier, peers: list[SrPeer]
):
    pacs_port, research_port = free_port(), free_port()
    config = _config(tmp_path, pacs_port, research_port,
                     rule=({"name": "research-too", "destinations": ["pacs", "research"]},))
    worker = Worker(config, Store(config.store), classifier)
    for path in ct_files(studies_root, "study_002"):
        put(worker.store, path)
    worker.step(send=False)  # classified; one delivery job per destination queued
    (record,) = worker.store.jobs.list_series()
    assert {d: r.state for d, r in _by_destination(worker).items()} == {
        "pacs": "pending", "research": "pending"
    }
    assert record.rule == "research-too"

    peers.append(SrPeer(pacs_port, stall=True))  # takes the SR, never answers
    peers.append(SrPeer(research_port, stall=True))
    sender = subprocess.Popen([sys.executable, "-c", _SEND_DUE, json.dumps(config.to_dict())],
                              env=dict(os.environ), start_new_session=True)
    try:
        wait_for(lambda: peers[0].received or peers[1].received, 60, "an SR to be in flight")
        os.kill(sender.pid, signal.SIGKILL)
        sender.wait(30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(30)
    assert all(d.state == "pending" for d in _by_destination(worker).values())

    for peer in peers:
        peer.stall = False
        peer.release.set()
    run_until_idle(worker)

    assert {d: r.state for d, r in _by_destination(worker).items()} == {
        "pacs": "sent", "research": "sent"
    }
    for peer in peers:  # the same instance at most twice: the destination holds one SR
        assert set(peer.received) == {record.sr_sop_instance_uid}
        assert 1 <= len(peer.received) <= 2
    worker.close()
    worker.store.close()
    assert pydicom.dcmread(worker.store.root / record.sr_path).SOPInstanceUID == (
        record.sr_sop_instance_uid
    )


def test_an_hl7_destination_gets_the_oru_of_the_results_its_rule_sends_it(
    tmp_path: Path, studies_root: Path, classifier, peers: list[SrPeer]
):
    """`[destination.NAME] kind = "hl7"`: an ORU per result to that RIS, beside the SR."""
    from test_hl7 import Ris

    from ctcovid.report.oru import parse_oru

    pacs_port = free_port()
    peers.append(SrPeer(pacs_port))
    ris = Ris()
    try:
        config = NodeConfig(
            store=tmp_path / "store", stable_seconds=0, retry_seconds=0.5, min_free_mb=0,
            destination={"pacs": {"kind": "dicom", "peer": f"127.0.0.1:{pacs_port}:PEER"},
                         "radiology-ris": {"kind": "hl7", "address": ris.address}},
        )
        assert [(d.name, d.kind, d.address) for d in config.destinations][1] == (
            "radiology-ris", "hl7", ris.address
        )
        worker = Worker(config, Store(config.store), classifier)
        for path in ct_files(studies_root, "study_000"):
            put(worker.store, path)
        run_until_idle(worker)
        (record,) = worker.store.jobs.list_series()
        deliveries = _by_destination(worker)
        assert {d: r.state for d, r in deliveries.items()} == {
            "pacs": "sent", "radiology-ris": "sent"
        }
        assert peers[0].received == [record.sr_sop_instance_uid]
        (message,) = ris.messages
        assert parse_oru(message).msh.msh_10.value == deliveries["radiology-ris"].message_id
        worker.close()
        worker.store.close()
    finally:
        ris.close()
    with pytest.raises(ConfigError, match=r"destination\.r\.address: required"):
        NodeConfig(store=tmp_path, destination={"r": {"kind": "hl7"}})
