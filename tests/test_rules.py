"""Routing rules: parsing and refusing, deciding, ``ctcovid rules test``, and the node acting on
them (classify and send, shadow: keep and send nothing, ignore: no model, files removed)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pydicom
import pytest
from node_helpers import (
    WORKER_READY_SECONDS,
    NodeProcess,
    Orthanc,
    free_port,
    put,
    require_tool,
    run_until_idle,
    storescp,
    variant_series,
    wait_for,
)
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from ctcovid.cli.main import app
from ctcovid.dicom.rules import DEFAULT_RULES, decide, parse_rules
from ctcovid.errors import ConfigError
from ctcovid.node.config import NodeConfig, Peer, load_config
from ctcovid.node.jobs import FINISHED, IGNORED, SENT, SHADOW
from ctcovid.node.store import Store
from ctcovid.node.worker import Worker

runner = CliRunner()

# The example, with the destination the node has: `peer` is the destination "default".
RULES_TOML = """
store = "store"

[[rule]]
name = "chest-thin"
action = "classify"
destinations = ["default"]
[rule.when]
Modality = "CT"
SeriesDescription = { regex = "(?i)lung|thorax|chest" }
SliceThickness = { min = 0.5, max = 2.0 }
BodyPartExamined = { in = ["CHEST", "LUNG"] }
ContrastBolusAgent = { present = false }

[[rule]]
name = "scouts-and-dose"
action = "ignore"
[rule.when]
SeriesDescription = { regex = "(?i)scout|dose" }

[[rule]]
name = "everything-else"
action = "shadow"
"""


def _header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _tables(text: str) -> list[dict]:
    import tomllib

    return tomllib.loads(text)["rule"]


# -- reading rules ------------------------------------------------------------------------------


def test_no_rules_means_classify_everything() -> None:
    assert parse_rules([]) == DEFAULT_RULES
    assert decide(DEFAULT_RULES, Dataset()).rule.action == "classify"


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"name": "a", "when": {"SliceThicknes": 1.0}}, "rule[0].when.SliceThicknes"),
        ({"name": "a", "when": {"SeriesDescription": {"regex": "(unclosed"}}}, "rule[0].when"),
        ({"name": "a", "when": {"SliceThickness": {"min": 3, "max": 1}}}, "min 3 is above max 1"),
        ({"name": "a", "when": {"Modality": {"like": "CT"}}}, "unknown test like"),
        ({"name": "a", "when": {"PixelData": {"present": True}}}, "binary data"),
        ({"name": "a", "action": "send"}, "rule[0].action"),
        ({"name": "a", "destinations": ["research"]}, "no destination named research"),
        ({"name": "a", "colour": "red"}, "unknown key(s) colour"),
        ({"action": "shadow"}, "rule[0].name"),
    ],
)
def test_a_bad_rule_is_refused_naming_its_key(table: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_rules([table, {"name": "rest"}] if "when" in table else [table], ["default"])


def test_the_last_rule_must_be_the_default() -> None:
    with pytest.raises(ConfigError, match=r"rule\[0\]\.when: the last rule"):
        parse_rules([{"name": "ct", "when": {"Modality": "CT"}}])


def test_a_bad_rule_stops_the_node_at_start_naming_its_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        RULES_TOML.replace("SliceThickness = {", "SliceThicknes = {").replace(
            'store = "store"', f'store = "{tmp_path / "store"}"\nport = 0'
        )
    )
    result = runner.invoke(app, ["listen", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "rule[0].when.SliceThicknes" in result.output
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_rules_beside_a_node_table_are_read(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nstore = "s"\npeer = "127.0.0.1:104:PACS"\n' + RULES_TOML[18:])
    loaded = load_config(config, {})
    assert [(r.name, r.action) for r in loaded.rules] == [
        ("chest-thin", "classify"),
        ("scouts-and-dose", "ignore"),
        ("everything-else", "shadow"),
    ]


def test_a_classify_rule_that_sends_nowhere_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='use action = "shadow"'):
        NodeConfig(store=tmp_path, peer=Peer("127.0.0.1", 104, "PACS"),
                   rule=({"name": "all", "destinations": []},))


# -- deciding -----------------------------------------------------------------------------------


def test_each_kind_of_condition() -> None:
    rules = parse_rules(_tables(RULES_TOML), ["default"])
    chest = _header(Modality="CT", SeriesDescription="Thorax 1mm", SliceThickness="1.0",
                    BodyPartExamined="CHEST")
    decision = decide(rules, chest)
    assert decision.rule.name == "chest-thin"
    checks = {c.keyword: (c.value, c.matched) for c in decision.tried[0][1]}
    assert checks == {
        "Modality": ("CT", True),
        "SeriesDescription": ("Thorax 1mm", True),
        "SliceThickness": ("1.0", True),
        "BodyPartExamined": ("CHEST", True),
        "ContrastBolusAgent": (None, True),
    }
    thick = _header(Modality="CT", SeriesDescription="Chest", SliceThickness="5",
                    BodyPartExamined="CHEST")
    assert decide(rules, thick).rule.name == "everything-else"
    contrast = _header(Modality="CT", SeriesDescription="Chest", SliceThickness="1",
                       BodyPartExamined="LUNG", ContrastBolusAgent="Iodine")
    assert decide(rules, contrast).rule.name == "everything-else"
    scout = _header(Modality="CT", SeriesDescription="Scout")
    assert decide(rules, scout).rule.name == "scouts-and-dose"
    # A missing attribute fails every test but `present = false`.
    assert decide(rules, _header(Modality="CT")).rule.name == "everything-else"


def test_multi_valued_attributes_and_the_calling_ae_title() -> None:
    rules = parse_rules(
        [
            {"name": "derived", "action": "ignore", "when": {"ImageType": {"in": ["DERIVED"]}}},
            {"name": "scanner2", "action": "shadow", "when": {"CallingAETitle": "CT2"}},
            {"name": "rest"},
        ]
    )
    derived = _header(ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    assert decide(rules, derived).rule.name == "derived"
    original = _header(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert decide(rules, original, "CT2").rule.name == "scanner2"
    assert decide(rules, original, "CT1").rule.name == "rest"
    whole = parse_rules([{"name": "w", "when": {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}},
                         {"name": "rest"}])
    assert decide(whole, original).rule.name == "w"


def test_a_value_that_looks_like_code_is_a_literal_string() -> None:
    payload = "__import__('os').system('touch pwned')"
    rules = parse_rules(
        [
            {"name": "literal", "when": {"SeriesDescription": payload}},
            {"name": "regex", "when": {"StationName": {"regex": "__import__"}}},
            {"name": "rest"},
        ]
    )
    assert decide(rules, _header(SeriesDescription="Chest")).rule.name == "rest"
    assert decide(rules, _header(SeriesDescription=payload)).rule.name == "literal"
    assert decide(rules, _header(StationName="__import__")).rule.name == "regex"
    assert not Path("pwned").exists()


# -- ctcovid rules test, and the node ------------------------------------------------------------


@pytest.fixture(scope="module")
def routed_series(studies_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    source = studies_root / "study_000" / "ct"
    root = tmp_path_factory.mktemp("routed")
    return {
        "chest-thin": variant_series(
            source, root / "thin", 101, SeriesDescription="Lung 1.0", SliceThickness="1.0"
        ),
        "scouts-and-dose": variant_series(
            source, root / "dose", 102, SeriesDescription="Dose Report"
        ),
        "everything-else": variant_series(
            source, root / "thick", 103, SeriesDescription="Chest 5mm", SliceThickness="5.0"
        ),
    }


def test_rules_test_names_the_rule_and_each_condition(
    routed_series: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(RULES_TOML.replace('store = "store"', 'peer = "127.0.0.1:104:PACS"'))
    root = next(iter(routed_series.values())).parent
    result = runner.invoke(app, ["rules", "test", str(root), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["series"]
    by_description = {r["series_description"]: r for r in rows}
    assert {d: r["rule"] for d, r in by_description.items()} == {
        "Lung 1.0": "chest-thin",
        "Dose Report": "scouts-and-dose",
        "Chest 5mm": "everything-else",
    }
    thick = by_description["Chest 5mm"]["tried"][0]["conditions"]
    assert {"keyword": "SliceThickness", "condition": "0.5 <= value <= 2", "value": "5.0",
            "matched": False} in thick
    text = runner.invoke(app, ["rules", "test", str(root), "--config", str(config)])
    assert text.exit_code == 0, text.output
    assert "[no ] SliceThickness 0.5 <= value <= 2: '5.0'" in text.output


def test_the_node_classifies_shadows_and_ignores_as_its_rules_say(
    routed_series: dict[str, Path], tmp_path: Path, classifier, pacs
) -> None:
    peer, received = pacs
    config = NodeConfig(
        store=tmp_path / "store", peer=peer, stable_seconds=0, retry_seconds=0, min_free_mb=0,
        rule=tuple(_tables(RULES_TOML)),
    )
    worker = Worker(config, Store(config.store), classifier)
    for folder in routed_series.values():
        for path in sorted(folder.iterdir()):
            put(worker.store, path, calling_aet="MODALITY")

    run_until_idle(worker)

    records = {r.rule: r for r in worker.store.jobs.list_series()}
    assert set(records) == set(routed_series)
    sent, ignored, shadow = (
        records["chest-thin"], records["scouts-and-dose"], records["everything-else"]
    )
    assert (sent.state, sent.sent_revision) == (SENT, 1)
    assert [str(ds.SOPInstanceUID) for ds in received] == [sent.sr_sop_instance_uid]
    # Shadow: classified, its SR kept in the store, nothing sent anywhere.
    assert shadow.state == SHADOW and shadow.sent_revision == 0
    assert shadow.probability_covid is not None and shadow.label
    assert (worker.store.root / shadow.sr_path).is_file()
    assert "shadow rule 'everything-else'" in shadow.reason
    # Ignore: no model, no SR, and the files are gone (ignore_keep_hours = 0).
    assert ignored.state == IGNORED and ignored.probability_covid is None
    assert ignored.sr_path == "" and "ignored by rule 'scouts-and-dose'" in ignored.reason
    assert worker.store.instance_paths(ignored.series_instance_uid) == []
    dose_dir = worker.store.files.series_dir(ignored.study_instance_uid,
                                             ignored.series_instance_uid)
    assert not dose_dir.exists() or not any(dose_dir.iterdir())
    worker.close()
    worker.store.close()

    # `ctcovid queue --json` shows each series' rule.
    queued = runner.invoke(app, ["queue", "--store", str(config.store), "--json"])
    assert queued.exit_code == 0, queued.output
    shown = {s["series_instance_uid"]: (s["rule"], s["state"])
             for s in json.loads(queued.output)["series"]}
    assert shown == {r.series_instance_uid: (r.rule, r.state) for r in records.values()}

    # `ctcovid rules test` on the same files says what the node did.
    toml = tmp_path / "node.toml"
    toml.write_text(RULES_TOML.replace('store = "store"', f'peer = "{peer}"'))
    root = next(iter(routed_series.values())).parent
    tested = runner.invoke(app, ["rules", "test", str(root), "--config", str(toml), "--json"])
    assert tested.exit_code == 0, tested.output
    assert {r["series_instance_uid"]: r["rule"] for r in json.loads(tested.output)["series"]} == {
        uid: rule for uid, (rule, _) in shown.items()
    }


def test_ignored_files_are_kept_for_ignore_keep_hours(
    routed_series: dict[str, Path], tmp_path: Path, classifier
) -> None:
    config = NodeConfig(
        store=tmp_path / "store", stable_seconds=0, min_free_mb=0, ignore_keep_hours=1.0,
        rule=({"name": "nothing", "action": "ignore"},),
    )
    worker = Worker(config, Store(config.store), classifier)
    folder = routed_series["scouts-and-dose"]
    for path in sorted(folder.iterdir()):
        put(worker.store, path)
    run_until_idle(worker)
    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.rule) == (IGNORED, "nothing")
    kept = worker.store.instance_paths(record.series_instance_uid)
    assert len(kept) == len(list(folder.iterdir())) and all(p.is_file() for p in kept)
    assert worker.remove_ignored_files() == 0  # not an hour yet
    worker.config = NodeConfig(**{**config.to_dict(), "ignore_keep_hours": 0.0})
    assert worker.remove_ignored_files() == len(kept)
    assert not any(p.exists() for p in kept)
    # The same series sent again is new content: received, judged again.
    put(worker.store, sorted(folder.iterdir())[0])
    assert worker.store.jobs.list_series()[0].state == "received"
    worker.close()
    worker.store.close()
    shutil.rmtree(tmp_path / "store")


@pytest.mark.network
def test_a_node_routes_what_orthanc_sends_by_its_rules(
    routed_series: dict[str, Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`ctcovid listen --config` with rules and two destinations, Orthanc pushing one study of
    three series (REST /modalities/{id}/store): the thin chest series' SR arrives in Orthanc and
    in dcmtk's storescp (a named destination), the other two send nothing anywhere."""
    require_tool("Orthanc")
    orthanc_port, research_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'peer = "127.0.0.1:{orthanc_port}:ORTHANC"\n'
        + RULES_TOML.replace('store = "store"', "")
        .replace('Modality = "CT"', 'Modality = "CT"\nCallingAETitle = "ORTHANC"')
        .replace('destinations = ["default"]', 'destinations = ["default", "research"]')
        + f'\n[destination.research]\nkind = "dicom"\npeer = "127.0.0.1:{research_port}:PACS"\n'
    )
    research = contextlib.ExitStack()
    research.enter_context(storescp(tmp_path / "research", research_port))
    node = NodeProcess(tmp_path / "store", tiny_model_dir, tmp_path / "node.log", "--port", "0",
                       "--stable-seconds", "2", "--config", str(config))
    orthanc = Orthanc(tmp_path / "orthanc", node.port, dicom_port=orthanc_port)
    try:
        study_ids = {orthanc.upload(p)["ParentStudy"]
                     for folder in routed_series.values() for p in sorted(folder.iterdir())}
        (study_id,) = study_ids
        orthanc.request("POST", "/modalities/ctcovid/store", study_id.encode())

        def finished() -> dict[str, tuple[str, str]] | None:
            store = Store(tmp_path / "store")
            try:
                states = {r.series_instance_uid: (r.rule, r.state)
                          for r in store.jobs.list_series()}
            finally:
                store.close()
            done = len(states) == 3 and all(s in FINISHED for _, s in states.values())
            return states if done else None

        states = wait_for(finished, WORKER_READY_SECONDS + 180, "the node to route all three",
                          interval=2.0)
        assert sorted(states.values()) == [
            ("chest-thin", "sent"), ("everything-else", "shadow"), ("scouts-and-dose", "ignored")
        ]
        sr_series = [s for s in orthanc.get(f"/studies/{study_id}/series")
                     if s["MainDicomTags"].get("Modality") == "SR"]
        assert len(sr_series) == 1 and len(sr_series[0]["Instances"]) == 1
        thin_uid = next(uid for uid, (rule, _) in states.items() if rule == "chest-thin")
        sr = orthanc.get(f"/instances/{sr_series[0]['Instances'][0]}/tags?simplify")
        evidence = sr["CurrentRequestedProcedureEvidenceSequence"][0]["ReferencedSeriesSequence"]
        assert [s["SeriesInstanceUID"] for s in evidence] == [thin_uid]
        # The named destination: the same SR, and nothing else.
        stored = wait_for(lambda: list((tmp_path / "research").iterdir()), 60,
                          "the SR to reach the research destination", interval=1.0)
        assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in stored] == [sr["SOPInstanceUID"]]
    finally:
        orthanc.close()
        node.close()
        research.close()


@pytest.mark.network
def test_rules_choose_who_hears_of_a_result_the_ris_among_them(
    routed_series: dict[str, Path], tmp_path: Path, classifier, pacs
) -> None:
    """With a RIS: a rule listing it sends the ORU, one leaving it out does not, shadow sends
    neither SR nor ORU."""
    from test_hl7 import Ris

    peer, received = pacs
    rules = [
        {"name": "lung", "when": {"SeriesDescription": {"regex": "Lung"}},
         "destinations": ["default", "ris"]},
        {"name": "dose", "when": {"SeriesDescription": {"regex": "Dose"}},
         "destinations": ["default"]},
        {"name": "rest", "action": "shadow"},
    ]
    ris = Ris()
    try:
        config = NodeConfig(store=tmp_path / "store", peer=peer, hl7=ris.address,
                            stable_seconds=0, retry_seconds=0, min_free_mb=0, rule=tuple(rules))
        worker = Worker(config, Store(config.store), classifier)
        for folder in routed_series.values():
            for path in sorted(folder.iterdir()):
                put(worker.store, path)
        run_until_idle(worker)
        records = {r.rule: r for r in worker.store.jobs.list_series()}
        assert {rule: r.state for rule, r in records.items()} == {
            "lung": SENT, "dose": SENT, "rest": SHADOW
        }
        assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(
            records[rule].sr_sop_instance_uid for rule in ("lung", "dose")
        )
        (delivery,) = worker.store.jobs.deliveries()
        assert delivery.series_instance_uid == records["lung"].series_instance_uid
        assert delivery.state == "sent" and len(ris.messages) == 1
        worker.close()
        worker.store.close()
    finally:
        ris.close()
    with pytest.raises(ConfigError, match="leaves out 'default'"):
        NodeConfig(store=tmp_path / "s2", peer=peer, hl7="127.0.0.1:2575",
                   rule=({"name": "ris-only", "destinations": ["ris"]},))
