"""The node's store: received files (:mod:`ctcovid.node.files`) and their jobs
(:mod:`ctcovid.node.jobs`) under one folder, kept consistent with each other.

Layout under the store folder: ``instances/``, ``sr/``, ``replaced/`` and ``tmp/`` (see
:mod:`ctcovid.node.files`), and ``node.sqlite``, the job database (see :mod:`ctcovid.node.jobs`
for the job states). An instance is written and renamed into place first, then recorded; the
files are the ground truth: :meth:`Store.reconcile` records any file the database missed (a crash
between rename and commit).

The same SOPInstanceUID received again with identical bytes changes nothing. With different
bytes the new instance is kept, the old file is moved (hard link, then rename) to ``replaced/`` and
recorded in the ``replaced`` table, and the series is classified again as a new revision: the SR
never describes pixels that are no longer in the store.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from ctcovid.node.files import FileStore, same_content
from ctcovid.node.jobs import (
    FAILED,
    DeliveryState,
    Destination,
    JobDatabase,
    SeriesRecord,
)

logger = logging.getLogger(__name__)

DB_FILE = "node.sqlite"


class Store:
    """Instances on disk and jobs in SQLite; safe to share between threads of a process.

    Several processes (the listener and the worker) open the same store; SQLite's locking
    serialises their writes. ``files`` (:class:`~ctcovid.node.files.FileStore`) and ``jobs``
    (:class:`~ctcovid.node.jobs.JobDatabase`, one method per transition of its state table) are
    the two halves, called as such; the methods here are the ones that need both.
    """

    def __init__(self, root: Path | str, *, min_free_mb: float = 0.0) -> None:
        self.files = FileStore(root, min_free_mb=min_free_mb)
        self.root = self.files.root
        self.db_path = self.root / DB_FILE
        self.jobs = JobDatabase(self.db_path)
        # Serialises "compare with the stored file, keep it aside, rename" per SOP instance.
        self._put_lock = threading.Lock()

    @property
    def min_free_bytes(self) -> int:
        """The free-space floor of the store's file system, in bytes."""
        return self.files.min_free_bytes

    @min_free_bytes.setter
    def min_free_bytes(self, value: int) -> None:
        self.files.min_free_bytes = value

    def close(self) -> None:
        self.jobs.close()

    # -- instances --------------------------------------------------------------------------

    def put_instance(
        self,
        data: bytes,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        calling_aet: str = "",
        accession_number: str = "",
    ) -> bool:
        """Store one instance (Part 10 bytes) and record it; True if it was new to the store.

        Raises :class:`InvalidUidError` before anything is written, :class:`OutOfSpaceError`
        below the free-space floor, ``OSError`` when the disk fails.
        """
        path = self.files.instance_path(study_instance_uid, series_instance_uid, sop_instance_uid)
        self.files.check_free_space(len(data))
        tmp = self.files.write_temp(path.name, data)
        try:
            with self._put_lock:
                return self._place_instance(
                    tmp,
                    path,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    calling_aet=calling_aet,
                    accession_number=accession_number,
                )
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _place_instance(
        self,
        tmp: Path,
        path: Path,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        calling_aet: str,
        accession_number: str = "",
    ) -> bool:
        """Rename the fsynced ``tmp`` into place unless the store already holds these bytes."""
        row = self.jobs.stored_instance(sop_instance_uid)
        old = self.root / row[0] if row is not None else path
        supersedes: tuple[str, str, str] | None = None
        if old.is_file():
            if same_content(tmp, old):
                # A resend: nothing changes (record_instance only notes that it arrived).
                return self.record_instance(
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    path=path,
                    calling_aet=calling_aet,
                    accession_number=accession_number,
                )
            old_study = row[1] if row is not None else study_instance_uid
            old_series = row[2] if row is not None else series_instance_uid
            aside = self.files.keep_aside(old, old_study, old_series, sop_instance_uid)
            supersedes = (old_study, old_series, self.files.relative(aside))
        elif row is not None:  # recorded, but its file is gone: the new one takes its place
            supersedes = (row[1], row[2], "")
        self.files.move_into_place(tmp, path)
        if old != path and old.is_file():  # the UID moved to another series: it has a copy
            self.files.remove(old)
        if supersedes is not None:
            logger.warning(
                "event=instance_replaced study=%s series=%s sop=%s previous_study=%s "
                "previous_series=%s kept_as=%s",
                study_instance_uid,
                series_instance_uid,
                sop_instance_uid,
                supersedes[0],
                supersedes[1],
                supersedes[2] or "-",
            )
        return self.record_instance(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            path=path,
            calling_aet=calling_aet,
            supersedes=supersedes,
            accession_number=accession_number,
        )

    def record_instance(
        self,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        calling_aet: str = "",
        received_at: float | None = None,
        supersedes: tuple[str, str, str] | None = None,
        accession_number: str = "",
    ) -> bool:
        """Record the instance stored at ``path``; see :meth:`JobDatabase.record_instance`."""
        return self.jobs.record_instance(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            path=self.files.relative(path),
            calling_aet=calling_aet,
            received_at=received_at,
            supersedes=supersedes,
            accession_number=accession_number,
        )

    def reconcile(self) -> int:
        """Record instance files the database lacks and remove half-written temp files.

        Returns the number of instances recovered.
        """
        import pydicom

        self.files.remove_half_written()
        known = self.jobs.known_instances()
        recovered = 0
        for study, series, sop, path in self.files.instance_files():
            if sop in known:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
                sop_class = str(ds.get("SOPClassUID", ""))
            except Exception as exc:  # the file was renamed complete; a bad one is still kept
                logger.warning("event=reconcile_unreadable path=%s error=%s", path, exc)
                sop_class = ""
            self.record_instance(
                study_instance_uid=study,
                series_instance_uid=series,
                sop_instance_uid=sop,
                sop_class_uid=sop_class,
                path=path,
                received_at=path.stat().st_mtime,
            )
            recovered += 1
            logger.info("event=instance_recovered study=%s series=%s sop=%s", study, series, sop)
        return recovered

    def instance_paths(
        self, series_instance_uid: str, study_instance_uid: str | None = None
    ) -> list[Path]:
        """The recorded files of a series (of every study that has that series UID if no study
        is given)."""
        return [
            self.root / p for p in self.jobs.instance_paths(series_instance_uid, study_instance_uid)
        ]

    # -- jobs that name files ---------------------------------------------------------------

    def finish_classified(
        self,
        record: SeriesRecord,
        *,
        revision: int,
        sr_path: Path,
        sr_sop_instance_uid: str,
        probability_covid: float,
        label: str,
        classify_seconds: float,
        deliveries: Sequence[Destination] = (),
        shadow: str | None = None,
        handed_over: bool = False,
    ) -> bool:
        """Record the built SR, and queue it for ``deliveries``; False (and re-queued) if the
        series changed while classifying. ``shadow``: the ``shadow`` rule that keeps it;
        ``handed_over``: the deliveries are all it has (see the job database's method)."""
        return self.jobs.finish_classified(
            record,
            revision=revision,
            sr_path=self.files.relative(sr_path),
            sr_sop_instance_uid=sr_sop_instance_uid,
            probability_covid=probability_covid,
            label=label,
            classify_seconds=classify_seconds,
            deliveries=deliveries,
            shadow=shadow,
            handed_over=handed_over,
        )

    def retry(
        self, series_instance_uid: str | None = None, study_instance_uid: str | None = None
    ) -> list[str]:
        """Re-queue failed jobs (one series, or all): resend a built SR, else classify again;
        and failed deliveries to other destinations (the RIS), which send their message again.

        Returns the series UIDs re-queued.
        """
        jobs = self.jobs.retry(
            series_instance_uid,
            study_instance_uid,
            sr_exists=lambda sr_path: (self.root / sr_path).exists(),
        )
        deliveries = self.jobs.retry_deliveries(series_instance_uid, study_instance_uid)
        return list(dict.fromkeys([*jobs, *deliveries]))

    def retry_series(
        self, series_instance_uid: str, study_instance_uid: str | None = None
    ) -> list[str]:
        """Re-queue one failed series, as :meth:`retry`; :class:`NotRetryable` (with the
        reason) when the store has no such series or its job is not failed. The one path of
        ``ctcovid queue --retry`` and of the node's page and API."""
        record = self.jobs.get(series_instance_uid, study_instance_uid)
        if record is None:
            raise NotRetryable(
                f"Series {series_instance_uid}: not in the store {self.root}", missing=True
            )
        failed_deliveries = [
            d
            for d in self.jobs.deliveries(record.study_instance_uid, series_instance_uid)
            if d.state == DeliveryState.FAILED
        ]
        if record.state != FAILED and not failed_deliveries:
            raise NotRetryable(
                f"Series {series_instance_uid}: state is {record.state} and no delivery of it "
                "failed; only failed jobs and deliveries can be retried"
            )
        return self.retry(series_instance_uid, record.study_instance_uid)


class NotRetryable(ValueError):
    """A retry asked for a series that is not in the store or whose job is not failed."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
