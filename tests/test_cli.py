"""The command line as a user meets it: series, preprocess, classify, fixtures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctcovid.cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ct_dir(studies_root: Path, study_infos: list, index: int) -> Path:
    return studies_root / study_infos[index]["study_dir"] / "ct"


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("series", "preprocess", "classify", "fixtures"):
        assert command in result.output


def test_series_json_lists_every_series_with_usability(studies_root, study_infos):
    result = invoke("series", studies_root, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    uids = {s["series_instance_uid"] for s in data["series"]}
    assert uids == {s["series_instance_uid"] for s in study_infos}
    for s in data["series"]:
        assert set(s) >= {
            "series_instance_uid",
            "study_instance_uid",
            "modality",
            "n_instances",
            "usable",
            "reason",
        }
        assert s["usable"] is True and s["modality"] == "CT"


def test_preprocess_writes_slices_positions_and_uids(studies_root, study_infos, tmp_path):
    out = tmp_path / "ct.npz"
    result = invoke("preprocess", ct_dir(studies_root, study_infos, 0), "--out", out)
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert data["slices"].shape == (12, 256, 256) and data["slices"].dtype == np.uint8
    assert list(data["z_mm"]) == sorted(data["z_mm"])
    assert len(set(data["sop_instance_uids"])) == 12


def test_preprocess_of_a_mixed_folder_names_the_candidates(studies_root, study_infos, tmp_path):
    result = invoke("preprocess", studies_root, "--out", tmp_path / "x.npz")
    assert result.exit_code == 1
    assert "usable CT series" in result.output
    assert study_infos[0]["series_instance_uid"] in result.output.replace("\n", "")


def test_classify_json_has_the_contract_keys(studies_root, study_infos, tiny_model_dir):
    result = invoke(
        "classify", ct_dir(studies_root, study_infos, 0), "--model", tiny_model_dir, "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "series_instance_uid",
        "study_instance_uid",
        "probability_covid",
        "label",
        "threshold",
        "n_slices_total",
        "n_slices_used",
        "slice_probabilities",
        "model",
        "seconds",
    ):
        assert key in data
    assert data["series_instance_uid"] == study_infos[0]["series_instance_uid"]
    assert data["probability_covid_raw"] == pytest.approx(np.mean(data["slice_probabilities"]))
    assert data["probability_covid"] == round(data["probability_covid_raw"], 3)
    assert data["label"] == (
        "covid" if data["probability_covid"] >= data["threshold"] else "non-covid"
    )
    assert data["n_slices_used"] == len(data["slice_probabilities"]) == 12
    assert data["n_slices_lost"] == 0 and data["n_slices_total"] == 12
    assert data["stack"]["n_slices"] == 12 and data["stack"]["image_type"][0] == "ORIGINAL"
    assert set(data["model"]) == {"name", "version", "device_uid", "runtime"}
    assert data["runtime"] == data["model"]["runtime"] == "keras"


def test_classify_writes_a_readable_sr_and_heatmaps(
    studies_root, study_infos, tiny_model_dir, tmp_path
):
    sr = tmp_path / "sr.dcm"
    result = invoke(
        "classify",
        ct_dir(studies_root, study_infos, 1),
        "--model",
        tiny_model_dir,
        "--json",
        "--sr",
        sr,
        "--heatmaps",
        tmp_path / "hm",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ds = pydicom.dcmread(sr)
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == data["study_instance_uid"]
    pngs = sorted((tmp_path / "hm").glob("*.png"))
    assert len(pngs) == min(5, data["n_slices_used"])


def test_classify_without_a_model_says_how_to_get_one(
    studies_root, study_infos, tmp_path, monkeypatch
):
    monkeypatch.setenv("CTCOVID_MODEL", str(tmp_path / "missing"))
    result = invoke("classify", ct_dir(studies_root, study_infos, 0))
    assert result.exit_code == 1
    assert "ctcovid train" in result.output
    assert "Traceback" not in result.output


def test_classify_a_folder_without_usable_ct_exits_1_with_one_line(tmp_path, tiny_model_dir):
    import dicom_fixtures

    dicom_fixtures.write_mr_series(tmp_path / "mr", dicom_fixtures.make_identity(0, 0))
    result = invoke("classify", tmp_path, "--model", tiny_model_dir)
    assert result.exit_code == 1
    assert "no usable CT series" in result.output
    assert "modality MR is not CT" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_fixtures_command_writes_studies_and_cov19_layout(tmp_path):
    result = invoke(
        "fixtures",
        tmp_path,
        "--studies",
        "2",
        "--slices",
        "4",
        "--size",
        "32",
        "--cov19-per-class",
        "1",
        "--cov19-slices",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["label"] for s in data["studies"]] == ["covid", "non-covid"]
    assert sorted(p.name for p in (tmp_path / "cov19" / "train").iterdir()) == [
        "covid",
        "non-covid",
    ]
    scan = tmp_path / "cov19" / "val" / "covid" / "ct_scan_0"
    assert sorted(p.name for p in scan.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]


def test_exit_codes_tell_bad_usage_from_internal_failure(tmp_path):
    """0 success, 1 bad usage or bad input, 2 internal failure (Click alone would say 2 for a
    bad flag too)."""
    from ctcovid.cli.common import handle_errors

    assert invoke("classify", "--no-such-flag", tmp_path).exit_code == 1
    assert invoke("no-such-command").exit_code == 1
    assert invoke("classify").exit_code == 1  # missing argument
    assert invoke("series", tmp_path / "missing").exit_code == 1  # bad input

    @handle_errors
    def broken() -> None:
        raise RuntimeError("a bug")

    import typer

    with pytest.raises(typer.Exit) as caught:
        broken()
    assert caught.value.exit_code == 2


def test_progress_in_a_pipe_is_plain_lines_not_redrawn_bars():
    from io import StringIO

    from rich.console import Console

    from ctcovid.training.progress import LineProgress, console_progress

    out = StringIO()
    console = Console(file=out, width=60)
    progress = console_progress(console)
    assert isinstance(progress, LineProgress)
    with progress:
        progress.start("caching slices", total=3, unit="scans")
        for _ in range(3):
            progress.advance(1, loss=0.25)
    text = out.getvalue()
    assert text.startswith("caching slices: 3/3 scans, 0 s, loss 0.25")
    assert "━" not in text and "…" not in text


# What TensorFlow writes to descriptor 2 while it is imported, whatever TF_CPP_MIN_LOG_LEVEL says,
# on CPUs where oneDNN's custom operations are on (absl's pre-init warning, the oneDNN note).
_TENSORFLOW_CHATTER = re.compile(r"absl::|oneDNN|port\.cc|cpu_feature_guard")


def _tensorflow_chatter(env: dict[str, str]) -> list[str]:
    """The start-up lines a bare ``import tensorflow`` writes to stderr under ``env``."""
    proc = subprocess.run(
        [sys.executable, "-c", "import tensorflow"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stderr.splitlines() if _TENSORFLOW_CHATTER.search(line)]


def test_classify_in_a_fresh_process_keeps_stderr_free_of_library_chatter(
    studies_root, study_infos, tiny_model_dir, capsys
):
    """At default verbosity stderr holds our own lines only: no TensorFlow, absl or oneDNN
    start-up lines.

    The check only means something where TensorFlow does write such lines at the level we set
    (``TF_CPP_MIN_LOG_LEVEL=3``): CPUs with AVX-512 VNNI or AMX, where oneDNN's custom
    operations are on by default. Elsewhere (AVX2 only) the test turns them on
    (``TF_ENABLE_ONEDNN_OPTS=1``), which makes TensorFlow write the same lines there, and says
    which case it ran.
    """
    base = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env = {**base, "TF_CPP_MIN_LOG_LEVEL": "3"}
    chatter = _tensorflow_chatter(env)
    case = "oneDNN custom operations on by default on this CPU"
    if not chatter:
        base["TF_ENABLE_ONEDNN_OPTS"] = env["TF_ENABLE_ONEDNN_OPTS"] = "1"
        chatter = _tensorflow_chatter(env)
        case = "oneDNN custom operations turned on by the test (off by default on this CPU)"
    if not chatter:
        pytest.skip("TensorFlow writes no start-up line here even with oneDNN forced on")
    with capsys.disabled():
        print(f"\n[quiet check] {case}: a bare import writes {len(chatter)} line(s)")
    proc = subprocess.run(
        [sys.executable, "-m", "ctcovid.cli.main", "classify",
         str(ct_dir(studies_root, study_infos, 0)), "--model", str(tiny_model_dir), "--json"],
        env=base, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_slices_used"] > 0
    assert proc.stderr == ""


def _import_in_a_fresh_process(
    tmp_path: Path, package: str, source: str
) -> subprocess.CompletedProcess:
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(source)
    code = (
        "from ctcovid.logs import quiet_native_imports\n"
        f"quiet_native_imports(({package!r},))\n"
        f"import {package}\n"
        "print('imported')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_what_a_native_import_writes_to_descriptor_2_is_kept_off_stderr(tmp_path):
    proc = _import_in_a_fresh_process(
        tmp_path, "chatty_native", "import os\nos.write(2, b'I0000 port.cc] oneDNN note\\n')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "imported\n"
    assert proc.stderr == ""


def test_a_failing_native_import_shows_what_it_wrote_to_descriptor_2(tmp_path):
    proc = _import_in_a_fresh_process(
        tmp_path,
        "broken_native",
        "import os\nos.write(2, b'libfoo.so: cannot open shared object file\\n')\n"
        "raise ImportError('native part missing')\n",
    )
    assert proc.returncode == 1
    assert "libfoo.so: cannot open shared object file" in proc.stderr
    assert "ImportError: native part missing" in proc.stderr


def test_series_lists_the_stacks_of_a_series_and_the_rule_changes_the_choice(tmp_path):
    import dicom_fixtures

    identity = dicom_fixtures.make_identity(12, 0)
    series_uid = dicom_fixtures.make_uid(identity.study_instance_uid, "two-kernels")
    for name, kernel, n in (("lung", "LUNG", 10), ("soft", "STANDARD", 9)):
        hu = np.full((n, 16, 16), -1000, np.int16)
        dicom_fixtures.write_ct_series(
            hu,
            tmp_path / name,
            study=identity,
            series_instance_uid=series_uid,
            convolution_kernel=kernel,
            sop_uid_seed=name,
        )
    data = json.loads(invoke("series", tmp_path, "--json").stdout)
    [s] = data["series"]
    assert [(st["kernel"], st["n_slices"], st["chosen"]) for st in s["stacks"]] == [
        ("LUNG", 10, True),
        ("STANDARD", 9, False),
    ]
    assert s["stack"]["kernel"] == "LUNG" and s["n_slices"] == 10
    assert any("stack set aside (kernel STANDARD" in w for w in s["warnings"])
    text = invoke("series", tmp_path)
    assert text.exit_code == 0 and "stack" in text.output and "STANDARD" in text.output
    bad = invoke("series", tmp_path, "--stack-rule", "newest")
    assert bad.exit_code == 1 and "stack_rule" in bad.output


def test_error_lines_print_brackets_in_paths_as_written(tmp_path):
    """Console markup would swallow ``[0028,0010]`` and ``[bold]`` in a path and restyle it."""
    folder = tmp_path / "series [0028,0010] [bold] [::1]"
    folder.mkdir()
    result = invoke("classify", folder, "--model", tmp_path / "no[model]")
    assert result.exit_code == 1
    assert "no[model]" in " ".join(result.output.split())


def test_a_missing_extra_names_itself_in_the_install_hint(tmp_path, monkeypatch):
    """``pip install 'ctcovid[dicomweb]'``, not ``pip install 'ctcovid'``."""
    monkeypatch.setitem(sys.modules, "dicomweb_client", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "dicomweb_client.api", None)
    result = invoke(
        "batch", "--from-dicomweb", "http://127.0.0.1:9/dicom-web", "--query",
        "PatientID=P1", "--out", tmp_path / "out", "--model", tmp_path / "model",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "pip install 'ctcovid[dicomweb]'" in " ".join(result.output.split())
