"""The conformance statement: what it lists is what the node does, checked on the wire and on an SR.

The listener runs in this process on a free loopback port (no model); pynetdicom and dcmtk
propose every SOP class and transfer syntax the statement lists, and some it does not. The SR is
built from a small written series (as in ``test_report.py``), without a model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import NODE_AET, echoscu, storescu
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage
from test_report import _ct_dataset, _result_for, _write_series
from typer.testing import CliRunner

import ctcovid.node.scp as scp_module
from ctcovid.cli.main import app
from ctcovid.net import services
from ctcovid.node import conformance
from ctcovid.node.config import NodeConfig
from ctcovid.node.conformance import (
    LISTENER,
    conformance_statement,
    render,
    statement_config,
)
from ctcovid.node.scp import Listener
from ctcovid.node.store import Store
from ctcovid.report import build_sr

pytestmark = pytest.mark.network

README = Path(__file__).resolve().parent.parent / "README.md"
DEFLATED = "1.2.840.10008.1.2.1.99"
PRIVATE_SYNTAX = "1.2.3.4.5"


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    statement = conformance_statement(statement_config(None))
    return dict(json.loads(render(statement, "json")))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    config = NodeConfig(
        store=tmp_path / "store", host="127.0.0.1", port=0, ae_title=NODE_AET, min_free_mb=0
    )
    running = Listener(config, Store(config.store, min_free_mb=0))
    running.start()
    yield running
    running.stop(drain_seconds=2)
    running.store.close()


def _scp_classes(data: dict[str, Any]) -> list[str]:
    return [c["uid"] for c in data["sop_classes"] if c["role"] == "SCP" and c["ae"] == LISTENER]


def _associate(port: int, contexts: list[tuple[str, list[str]]]) -> Any:
    ae = AE(ae_title="CONFTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    return assoc


# --- the statement on the wire ---------------------------------------------------------------


def test_every_listed_context_is_accepted_and_unlisted_ones_rejected(data, listener):
    listed = [
        (sop_class, syntax)
        for sop_class in _scp_classes(data)
        for syntax in data["transfer_syntaxes"][sop_class]
    ]
    ct = "1.2.840.10008.5.1.4.1.1.2"
    unlisted = [
        (MRImageStorage, "1.2.840.10008.1.2.1"),
        (MRImageStorage, "1.2.840.10008.1.2"),
        (ct, DEFLATED),
        (ct, PRIVATE_SYNTAX),
        ("1.2.840.10008.5.1.4.1.1.2.1", DEFLATED),
        ("1.2.840.10008.1.1", PRIVATE_SYNTAX),
    ]
    assert len(listed) + len(unlisted) <= 128  # one association
    assert {c for c, _ in listed} >= {ct, "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.1.1"}

    assoc = _associate(listener.port, [(c, [s]) for c, s in [*listed, *unlisted]])
    try:
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        rejected = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.result
            for cx in assoc.rejected_contexts
        }
        echo = assoc.send_c_echo()
    finally:
        assoc.release()

    assert accepted == set(listed)
    assert set(rejected) == set(unlisted)
    # 0x03: abstract syntax not supported, 0x04: transfer syntaxes not supported (PS3.8).
    assert {rejected[(MRImageStorage, "1.2.840.10008.1.2.1")], rejected[(ct, DEFLATED)]} == {3, 4}
    assert rejected[(ct, PRIVATE_SYNTAX)] == 4
    assert int(echo.Status) == 0x0000


def test_the_listener_picks_the_first_syntax_in_its_own_order(data, listener):
    """The rule the statement states: our order of preference, whatever the proposer's order."""
    contexts = [(c, list(reversed(data["transfer_syntaxes"][c]))) for c in _scp_classes(data)]
    assoc = _associate(listener.port, contexts)
    try:
        chosen = {
            str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        }
    finally:
        assoc.release()
    assert chosen == {c: data["transfer_syntaxes"][c][0] for c in _scp_classes(data)}


def test_dcmtk_echo_and_store_as_the_statement_says(data, listener, tmp_path: Path):
    ds = _ct_dataset(0)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert str(ds.file_meta.TransferSyntaxUID) in data["transfer_syntaxes"][str(ds.SOPClassUID)]

    echo = echoscu(listener.port)
    store = storescu(listener.port, [path], extra=("-v",))

    assert echo.returncode == 0, echo.stderr
    assert store.returncode == 0, store.stderr
    assert "Success" in store.stderr
    assert listener.store.jobs.count_instances() == 1


def test_implementation_identity_is_what_the_listener_announces(data, listener):
    assoc = _associate(listener.port, [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])
    try:
        acceptor = assoc.acceptor
        assert str(acceptor.implementation_class_uid) == data["implementation_class_uid"]
        assert acceptor.implementation_version_name == data["implementation_version_name"]
        assert acceptor.maximum_length == data["maximum_pdu_bytes"]
    finally:
        assoc.release()


# --- the statement against the code's own tables ---------------------------------------------


def test_status_codes_are_every_status_the_listener_returns(data):
    listed = {s["value"] for s in data["status_codes"] if s["ae"] == LISTENER}
    source = Path(scp_module.__file__).read_text()
    used = {getattr(services, name) for name in re.findall(r"\b(STATUS_[A-Z_]+)\b", source)}
    assert used == set(services.STORE_STATUSES) == listed
    assert {"0xA700", "0xA900", "0xC210", "0xC211", "0x0110", "0x0000"} <= {
        s["code"] for s in data["status_codes"]
    }
    assert all(s["meaning"] for s in data["status_codes"])


def test_json_has_the_required_shape(data):
    for entry in data["sop_classes"]:
        assert set(entry) >= {"uid", "name", "role", "service"}
        assert entry["role"] in ("SCP", "SCU")
        assert entry["uid"] in data["transfer_syntaxes"]
    assert data["transfer_syntaxes"]["1.2.840.10008.5.1.4.1.1.2"] == list(
        services.TRANSFER_SYNTAXES
    )
    scu = {c["uid"] for c in data["sop_classes"] if c["role"] == "SCU"}
    assert {
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root FIND
        "1.2.840.10008.5.1.4.1.2.2.2",  # MOVE
        "1.2.840.10008.5.1.4.1.2.2.3",  # GET
    } <= scu
    assert "ISO_IR 192" in data["character_sets"] and "" not in data["character_sets"]
    assert data["implementation_class_uid"] and data["implementation_version_name"]
    # Deflate is neither accepted nor proposed anywhere (inflating a peer's stream is unbounded).
    for syntaxes in data["transfer_syntaxes"].values():
        assert "1.2.840.10008.1.2.1.99" not in syntaxes


def test_every_setting_is_listed_and_explained(data):
    fields = {f.name for f in dataclasses.fields(NodeConfig)} - {"extra"}
    assert set(data["configuration"]) == fields
    assert set(conformance._SETTINGS) == fields


# --- rendering, with the README's example configuration --------------------------------------


def _readme_toml(tmp_path: Path) -> Path:
    text = README.read_text()
    match = re.search(r"Every flag can also live in a TOML file.*?```toml\n(.*?)```", text, re.S)
    assert match, "README lost its node TOML example"
    path = tmp_path / "node.toml"
    path.write_text(match.group(1))
    return path


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        assert not any(name in ("src", "href") for name, _ in attrs), (tag, attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_markdown_and_html_for_the_readme_configuration(tmp_path: Path):
    toml = _readme_toml(tmp_path)
    config = statement_config(toml)
    statement = conformance_statement(config, toml)
    data = json.loads(render(statement, "json"))
    markdown = render(statement, "markdown")
    page = render(statement, "html")
    parser = _Text()
    parser.feed(page)
    text = "".join(parser.text)

    assert config.allow_aet == ("PACS", "ROUTER") and config.retry_seconds == 10
    assert data["configuration"]["peer"] == "pacs.example.org:104:PACS"
    for document in (markdown, text):
        for sop_class in data["sop_classes"]:
            assert sop_class["uid"] in document and sop_class["name"] in document
        assert "PACS, ROUTER" in document  # the allow-list as configured
        assert "pacs.example.org:104:PACS" in document
        # The audit trail: what is audited, and where it goes as configured.
        assert "Audit trail" in document and "IHE+RFC-3881" in document
        assert "Instances Transferred" in document and "110113" in document
        assert "arr.example.org:6514" in document
        assert data["implementation_class_uid"] in document
    # Self-contained and escaped: no script, no external resource, quotes of text escaped.
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "type=&quot;application/dicom&quot;" in page
    # The same sections and tables in both renderings.
    assert page.count("<table>") == markdown.count("\n|---|") > 10
    assert page.count("<section>") == len(re.findall(r"^#{2,6} ", markdown, re.M))


def test_cli_writes_each_format(tmp_path: Path):
    toml = _readme_toml(tmp_path)
    runner = CliRunner()
    for fmt in ("markdown", "html", "json"):
        out = tmp_path / f"statement.{fmt}"
        result = runner.invoke(
            app, ["conformance", "--config", str(toml), "--format", fmt, "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert out.stat().st_size > 1000
    data = json.loads((tmp_path / "statement.json").read_text())
    assert data["ae_title"] == "CTCOVID" and data["configuration"]["retry_seconds"] == 10
    assert (tmp_path / "statement.html").read_text().startswith("<!DOCTYPE html>")
    bad = runner.invoke(app, ["conformance", "--format", "pdf"])
    assert bad.exit_code == 1


# --- the SR the statement describes ----------------------------------------------------------


def _walk(items: Any, depth: int, out: set[tuple[int, str, str, str, str]]) -> None:
    for item in items:
        name = item.ConceptNameCodeSequence[0]
        out.add(
            (
                depth,
                item.RelationshipType,
                item.ValueType,
                name.CodeValue,
                name.CodingSchemeDesignator,
            )
        )
        if "ContentSequence" in item:
            _walk(item.ContentSequence, depth + 1, out)


def test_every_sr_attribute_listed_is_in_a_built_sr(data, tmp_path: Path):
    series = _write_series(tmp_path, [_ct_dataset(i) for i in range(4)])
    result = _result_for(series)
    first = build_sr(result, series)
    revised = build_sr(
        result,
        series,
        revision=2,
        predecessor_sop_instance_uid=first.SOPInstanceUID,
        predecessor_series_instance_uid=first.SeriesInstanceUID,
    )
    source = series.header
    listed = data["sr_attributes"]
    assert {row["origin"] for row in listed} == {"constant", "generated", "copied from source"}

    for row in listed:
        keyword, condition = row["keyword"], row["condition"]
        if condition == "always":
            assert keyword in first and keyword in revised, keyword
        elif condition == "if in source":
            assert (keyword in first) == (keyword in source), keyword
        elif condition == "revision 2 and later":
            assert keyword not in first and keyword in revised, keyword
        else:  # ReferencedRequestSequence: only when the source names requests
            assert (keyword in first) == ("RequestAttributesSequence" in source), keyword
    copied = [
        r["keyword"] for r in listed if r["condition"] == "if in source" and r["keyword"] in source
    ]
    assert {"PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"} <= set(copied)
    for row in listed:
        if row["keyword"] in (
            "Modality",
            "CompletionFlag",
            "VerificationFlag",
            "PreliminaryFlag",
            "ContinuityOfContent",
            "ValueType",
            "Manufacturer",
            "SOPClassUID",
        ):
            assert str(first[row["keyword"]].value) == row["value"], row
        if row["keyword"] == "SpecificCharacterSet":
            assert first.SpecificCharacterSet == source.SpecificCharacterSet
    assert first.InstanceNumber == 1 and revised.InstanceNumber == 2
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID

    # The content tree, both ways: every item listed is in the SR, every SR item is listed.
    tree = data["sr_content_tree"]
    root = tree[0]
    assert root["depth"] == 0 and first.ValueType == root["value_type"]
    assert first.ConceptNameCodeSequence[0].CodeValue == root["concept_name"]["value"]
    assert first.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    built: set[tuple[int, str, str, str, str]] = set()
    _walk(first.ContentSequence, 1, built)
    described = {
        (
            row["depth"],
            row["relationship"],
            row["value_type"],
            row["concept_name"]["value"],
            row["concept_name"]["scheme"],
        )
        for row in tree[1:]
    }
    assert described == built


def test_sr_concept_meanings_match_the_built_sr(data, tmp_path: Path):
    series = _write_series(tmp_path, [_ct_dataset(i) for i in range(2)])
    sr: Dataset = build_sr(_result_for(series, key_slice_indices=[1]), series)
    meanings: dict[tuple[str, str], str] = {}

    def collect(items: Any) -> None:
        for item in items:
            code = item.ConceptNameCodeSequence[0]
            meanings[(code.CodeValue, code.CodingSchemeDesignator)] = code.CodeMeaning
            if "ContentSequence" in item:
                collect(item.ContentSequence)

    collect(pydicom.dcmread(_saved(sr, tmp_path)).ContentSequence)
    for row in data["sr_content_tree"][1:]:
        name = row["concept_name"]
        assert meanings[(name["value"], name["scheme"])] == name["meaning"]


def _saved(ds: Dataset, folder: Path) -> Path:
    path = folder / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
