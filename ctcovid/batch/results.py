"""The durable record of a batch run: ``results.csv`` appended row by row, and the run identity.

Every finished series (classified, skipped or failed) becomes one CSV row, written, flushed and
fsynced before the next one, so an interrupted run loses at most the row it was writing. The CSV is
the source of truth for ``--resume``: a series with a row is finished; a torn last record (power cut
in the middle of a write) is cut off and that series is processed again. Fields may hold newlines
(decoder errors do), so a record is found with the CSV quoting rules, not by lines: it is complete
when it ends with a newline outside quotes and has every column.

``run.json`` names the model (its device UID) that made the results in a folder. One folder holds
the results of one model: resuming into a folder made by another model is refused, so results of
two models are never mixed.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ctcovid.errors import ConfigError
from ctcovid.fsio import fsync_dir, write_atomic

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.sqlite"
SR_DIR = "sr"
CARD_DIR = "cards"  # result cards (``--result-card``), each found from its SR by UID
LOCK_FILE = ".lock"

CLASSIFIED = "classified"
SKIPPED = "skipped"
FAILED = "failed"
# A PACS delivered fewer instances than it announced: not classified as if whole (the reason
# gives the counts).
INCOMPLETE = "incomplete"
STATUSES = (CLASSIFIED, SKIPPED, FAILED, INCOMPLETE)


@dataclass(frozen=True)
class ResultRow:
    """One line of ``results.csv``: what became of one series."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    status: str  # classified | skipped | failed
    reason: str = ""
    probability_covid: float | None = None
    label: str = ""
    n_slices_used: int | None = None
    sr_path: str = ""  # relative to the output folder
    threshold: float | None = None
    n_slices_total: int | None = None
    model_device_uid: str = ""
    seconds: float | None = None
    warnings: str = ""  # "; "-joined, e.g. files of the series that could not be decoded
    n_slices_lost: int | None = None  # last: results.csv files of earlier versions stay readable

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_csv_values(self) -> list[str]:
        out = []
        for name, value in asdict(self).items():
            if value is None:
                out.append("")
            elif name == "probability_covid":
                out.append(repr(float(value)))  # full precision: the CSV must reproduce classify
            else:
                out.append(str(value))
        return out

    @classmethod
    def from_csv_dict(cls, row: dict[str, str]) -> ResultRow:
        def opt_float(key: str) -> float | None:
            return float(row[key]) if row.get(key) else None

        def opt_int(key: str) -> int | None:
            return int(row[key]) if row.get(key) else None

        return cls(
            study_instance_uid=row["study_instance_uid"],
            series_instance_uid=row["series_instance_uid"],
            patient_id=row.get("patient_id", ""),
            status=row["status"],
            reason=row.get("reason", ""),
            probability_covid=opt_float("probability_covid"),
            label=row.get("label", ""),
            n_slices_used=opt_int("n_slices_used"),
            sr_path=row.get("sr_path", ""),
            threshold=opt_float("threshold"),
            n_slices_total=opt_int("n_slices_total"),
            model_device_uid=row.get("model_device_uid", ""),
            seconds=opt_float("seconds"),
            warnings=row.get("warnings", ""),
            n_slices_lost=opt_int("n_slices_lost"),
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.study_instance_uid, self.series_instance_uid)


def write_json_atomic(data: Any, path: Path) -> None:
    """Write JSON atomically and durably: a reader sees the old or the new file."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def complete_length(data: bytes, n_columns: int) -> int:
    """The length of the longest prefix of ``data`` made of complete CSV records.

    A record ends at a newline outside quotes: with Python's CSV dialect (fields quoted when
    needed, quotes doubled inside them) that is a newline after an even number of quote
    characters in the record. A record must also have ``n_columns`` fields, so a cut that
    happens to fall right after a newline inside a field is not taken for a whole record.
    ``"`` and newline are ASCII, so counting bytes is safe for UTF-8.
    """
    end = 0
    record_start = 0
    quotes = 0
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return end
        quotes += data.count(b'"', pos, nl)
        pos = nl + 1
        if quotes % 2:  # inside a quoted field: the record goes on
            continue
        record = data[record_start:pos].decode("utf-8", errors="replace")
        fields = next(csv.reader(io.StringIO(record, newline="")), [])
        if len(fields) != n_columns:
            return end
        end = record_start = pos
        quotes = 0


def _n_columns(data: bytes) -> int:
    """Columns of a results file, from its header line (a file of an earlier version has fewer:
    ``n_slices_lost`` was added last); today's count for a file without a complete header."""
    header, newline, _ = data.partition(b"\n")
    if not newline:
        return len(ResultRow.columns())
    return len(next(csv.reader([header.decode("utf-8", errors="replace")]), []))


def repair_torn_tail(path: Path) -> int:
    """Cut a last record that is incomplete (a write torn by a crash); bytes removed."""
    data = path.read_bytes()
    if not data:
        return 0
    keep = complete_length(data, _n_columns(data))
    if keep == len(data):
        return 0
    with open(path, "rb+") as fh:
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    logger.warning(
        "%s: removed a torn last record (%d bytes) left by an interrupted run",
        path,
        len(data) - keep,
    )
    return len(data) - keep


def read_results(path: Path) -> list[ResultRow]:
    """Every complete row of a results CSV (the header line first)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    data = data[: complete_length(data, _n_columns(data))]
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    rows = []
    for line_no, raw in enumerate(reader, start=2):
        try:
            rows.append(ResultRow.from_csv_dict(raw))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{path}: record {line_no} is not a valid result row ({exc})"
            ) from exc
    return rows


class ResultsWriter:
    """Appends rows to ``results.csv``; each row is on disk (fsync) when :meth:`append` returns.

    Rows already in the file (from an earlier, interrupted run) are loaded as finished; appending a
    row for a finished series is refused, so a resumed run cannot duplicate rows.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        columns = ResultRow.columns()
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            repair_torn_tail(self.path)
            with open(self.path, encoding="utf-8", newline="") as fh:
                header = next(csv.reader(fh), None)
            if header is None:
                new = True
            elif header != columns[: len(header)]:  # a file of an earlier version: its columns
                raise ConfigError(
                    f"{self.path}: columns {header} are not those of this ctcovid version "
                    f"({columns}); write to a new --out folder"
                )
        self.n_columns = len(columns) if new or header is None else len(header)
        self.rows: list[ResultRow] = [] if new else read_results(self.path)
        self.done: set[tuple[str, str]] = {row.key for row in self.rows}
        self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if new:
            self._fh.truncate(0)
            self._write_line(columns)
            fsync_dir(self.path.parent)

    def _write_line(self, values: Iterable[str]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(list(values))
        self._fh.write(buf.getvalue())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, row: ResultRow) -> None:
        if row.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}. Received: {row.status!r}.")
        if row.key in self.done:
            raise ValueError(f"Series {row.series_instance_uid} already has a row in {self.path}")
        self._write_line(row.to_csv_values()[: self.n_columns])
        self.done.add(row.key)
        self.rows.append(row)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RunInfo:
    """``run.json``: which model made the results of an output folder, and from which archive."""

    model_device_uid: str
    model_name: str
    model_version: str
    model_path: str
    archive: str
    created: str

    @classmethod
    def new(
        cls, *, device_uid: str, name: str, version: str, model_path: Path, archive: Path
    ) -> RunInfo:
        return cls(
            model_device_uid=device_uid,
            model_name=name,
            model_version=version,
            model_path=str(model_path),
            archive=str(archive),
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )


@contextlib.contextmanager
def lock_output(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder for a run (``fcntl.flock`` on ``.lock``).

    Two runs on one folder would each append the rows the other has not written yet; the
    second one is refused at once instead. The lock dies with its process, so a killed run
    never leaves a stale lock behind.
    """
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{out} is in use by another 'ctcovid batch' run; wait for it to finish or "
                "choose another --out folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prepare_output(out: Path, run: RunInfo, *, resume: bool) -> RunInfo:
    """Create or check an output folder for ``run``; the run that owns the folder.

    A folder with results is only entered with ``resume`` and only by the model that made them.
    """
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    results = out / RESULTS_FILE
    if run_file.exists():
        try:
            previous = RunInfo(**json.loads(run_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{run_file}: unreadable ({exc}); use a new --out folder") from exc
        if previous.model_device_uid != run.model_device_uid:
            raise ConfigError(
                f"{out} holds results of another model or runtime (device UID "
                f"{previous.model_device_uid}, {previous.model_path}); this model's device UID "
                f"is {run.model_device_uid}. "
                "Results of two models are never mixed: write to a new --out folder"
            )
        if not resume:
            raise ConfigError(
                f"{out} already holds a batch run; pass --resume to finish it, or choose a new "
                "--out folder"
            )
        if Path(previous.archive).resolve() != Path(run.archive).resolve():
            raise ConfigError(
                f"{out} was made from archive {previous.archive}, not {run.archive}; "
                "resume with the same archive or choose a new --out folder"
            )
        return previous
    if results.exists() and results.stat().st_size:
        raise ConfigError(f"{results} exists but {run_file} does not; choose a new --out folder")
    write_json_atomic(asdict(run), run_file)
    return run


class BatchProgress:
    """Callbacks the CLI implements with progress bars; the defaults do nothing."""

    def index_started(self, n_files: int) -> None: ...

    def index_advanced(self, n_done: int, n_total: int) -> None: ...

    def classify_started(self, n_series: int, n_slices: int) -> None: ...

    def series_finished(self, row: ResultRow, n_slices: int) -> None: ...


class ProgressThen(BatchProgress):
    """``inner``'s callbacks, then ``then(row)`` for each row written (send its SR on, empty
    its cache)."""

    def __init__(self, inner: BatchProgress, then: Callable[[ResultRow], None]):
        self.inner = inner
        self.then = then

    def index_started(self, n_files: int) -> None:
        self.inner.index_started(n_files)

    def index_advanced(self, n_done: int, n_total: int) -> None:
        self.inner.index_advanced(n_done, n_total)

    def classify_started(self, n_series: int, n_slices: int) -> None:
        self.inner.classify_started(n_series, n_slices)

    def series_finished(self, row: ResultRow, n_slices: int) -> None:
        self.inner.series_finished(row, n_slices)
        self.then(row)
