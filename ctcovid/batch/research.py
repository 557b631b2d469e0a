"""The pseudonymised research export of a batch run: ``results.csv`` and the SRs, de-identified.

A batch folder is the site's: its ``results.csv`` names patients and its SRs carry the whole
patient and study modules. The export beside it is for a research team: one row per series
with keyed pseudonyms for patient ID and accession number and remapped UIDs, and each SR
de-identified (``ctcovid.report.deid``: PS3.15 Annex E with keyed pseudonyms). The same key
gives the same pseudonyms, UIDs and file names in every export, so exports of two runs join.

What a row keeps, column by column (``results.csv`` of the run -> the export):

- ``patient_id`` -> ``patient_pseudonym`` (the SRs' Patient ID); ``accession_pseudonym`` is new,
  from the SR's Accession Number (empty for a series without an SR: the index has none);
- ``study_instance_uid``, ``series_instance_uid``, ``model_device_uid`` -> remapped, as in the SRs;
- ``status``, ``probability_covid``, ``label``, ``threshold``, ``n_slices_used``,
  ``n_slices_total``, ``n_slices_lost``, ``seconds``: kept, they say nothing of the patient;
- ``sr_path`` -> the de-identified SR in the export (``sr/<remapped SOP Instance UID>.dcm``);
- ``reason`` and ``warnings``: left out. They are free text that names files, folders, UIDs and
  attribute values of the source; the status says what became of the series.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom

from ctcovid.batch.results import (
    RESULTS_FILE,
    RUN_FILE,
    SR_DIR,
    lock_output,
    read_results,
    write_json_atomic,
)
from ctcovid.errors import ConfigError, ReportError
from ctcovid.fsio import write_atomic
from ctcovid.report.deid import (
    METHOD_CODES,
    METHOD_TEXT,
    Deidentifier,
    PseudonymKey,
    encode,
)

logger = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
#: The folder of a batch run that ``ctcovid batch --pseudonymize`` writes the export to.
RESEARCH_DIR = "research"

COLUMNS = (
    "patient_pseudonym",
    "accession_pseudonym",
    "study_instance_uid",
    "series_instance_uid",
    "status",
    "probability_covid",
    "label",
    "threshold",
    "n_slices_used",
    "n_slices_total",
    "n_slices_lost",
    "model_device_uid",
    "seconds",
    "sr_path",
)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _model(run_dir: Path, key: PseudonymKey) -> dict[str, str]:
    """The model's name and version from ``run.json`` (not its paths: folder names can name
    people), its device UID remapped as in the SRs."""
    try:
        run = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {
        "name": str(run.get("model_name", "")),
        "version": str(run.get("model_version", "")),
        "device_uid": key.uid(str(run.get("model_device_uid", ""))),
    }


def export_run(
    run_dir: Path, out_dir: Path, key: PseudonymKey, *, lock: bool = True
) -> dict[str, Any]:
    """Write the research export of batch folder ``run_dir`` to ``out_dir``; its summary.

    ``lock``: hold the run folder's lock while reading its results (a batch run that is still
    writing them refuses the export); false for the batch run itself, which holds it already.

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a batch folder, ``out_dir`` is ``run_dir`` itself, or ``out_dir``
        holds an export made with another key.
    ReportError
        If an SR of the run cannot be read or de-identified (the file is named).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    results = run_dir / RESULTS_FILE
    if not results.is_file():
        raise ConfigError(f"{run_dir}: no {RESULTS_FILE}; not a 'ctcovid batch' output folder")
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError(
            f"{out_dir}: the export cannot replace the run's own files; choose another --out "
            f"(e.g. {run_dir / RESEARCH_DIR})"
        )
    check_export_folder(out_dir, key)
    if lock:
        with lock_output(run_dir):
            rows = read_results(results)
    else:
        rows = read_results(results)
    deidentifier = Deidentifier(key)
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    writer.writerow(COLUMNS)
    n_srs = 0
    for row in rows:
        accession = ""
        sr_path = ""
        if row.sr_path:
            source = run_dir / row.sr_path
            try:
                original = pydicom.dcmread(source)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                raise ReportError(
                    f"{source}: the SR of series {row.series_instance_uid} cannot be read ({exc})"
                ) from exc
            accession = key.pseudonym("Accession", str(original.get("AccessionNumber", "") or ""))
            try:
                copy = deidentifier.deidentify(original)
            except ReportError as exc:  # name the site's file: the remapped UID finds nothing
                raise ReportError(f"{source}: {exc}") from exc
            relative = Path(SR_DIR) / f"{copy.SOPInstanceUID}.dcm"
            write_atomic(out_dir / relative, encode(copy))
            sr_path = str(relative)
            n_srs += 1
        writer.writerow(
            [
                key.pseudonym("PatientID", row.patient_id),
                accession,
                key.uid(row.study_instance_uid),
                key.uid(row.series_instance_uid),
                row.status,
                _text(row.probability_covid),
                row.label,
                _text(row.threshold),
                _text(row.n_slices_used),
                _text(row.n_slices_total),
                _text(row.n_slices_lost),
                key.uid(row.model_device_uid),
                _text(row.seconds),
                sr_path,
            ]
        )
    write_atomic(out_dir / RESULTS_FILE, lines.getvalue())
    summary: dict[str, Any] = {
        "out": str(out_dir),
        "results_csv": str(out_dir / RESULTS_FILE),
        "rows": len(rows),
        "srs": n_srs,
        "counts": dict(Counter(row.status for row in rows)),
        "key_id": key.key_id,
        "model": _model(run_dir, key),
        "deidentification_method": list(METHOD_TEXT),
        "deidentification_method_codes": [
            {"value": value, "scheme": "DCM", "meaning": meaning} for value, meaning in METHOD_CODES
        ],
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(summary, out_dir / EXPORT_FILE)
    logger.info("research export: %d rows, %d SRs in %s", len(rows), n_srs, out_dir)
    return summary


def check_export_folder(out_dir: Path, key: PseudonymKey) -> None:
    """An export folder belongs to one key: files of two keys would never join, and an SR of
    the first key would stay beside the second key's results."""
    previous = out_dir / EXPORT_FILE
    if previous.exists():
        try:
            key_id = json.loads(previous.read_text(encoding="utf-8")).get("key_id")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{previous}: unreadable ({exc}); choose a new --out") from exc
        if key_id != key.key_id:
            raise ConfigError(
                f"{out_dir} holds an export made with another key (key id {key_id}); "
                "choose a new --out"
            )
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty and holds no export; choose a new --out")
