"""The node's readiness: five checks, each ``{"ok": bool, "detail": str}``, for ``/readyz``
and the status page.

``database``     the job database takes a write lock within two seconds (nothing is written)
``disk``         the store's file system has more free space than ``min_free_mb``
``worker``       the worker process is alive and its heartbeat (the supervisor's shared
                 ``time.monotonic()`` value) is younger than ``worker_stall_seconds``
``destination``  the peer answers C-ECHO, or the STOW-RS service answers HTTP; asked at most once
                 a minute, the answer cached in between (no destination: ok)
``model``        the model folder's ``ctcovid.json``: name, version, weights sha256, runtime
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctcovid.node.config import NodeConfig

MIB = 1024 * 1024
DESTINATION_CHECK_SECONDS = 60.0
# A C-ECHO or HTTP request of the check gives up after this long (the peer counts as down).
DESTINATION_TIMEOUT_SECONDS = 5.0
DATABASE_TIMEOUT_SECONDS = 2.0


@dataclass
class Check:
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def check_database(db_path: Path) -> Check:
    """Whether the job database can be written now (a write lock taken, then let go)."""
    try:
        conn = sqlite3.connect(db_path, timeout=DATABASE_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Check(False, f"{db_path.name}: not writable: {exc}")
    return Check(True, f"{db_path.name}: writable")


def check_disk(root: Path, min_free_bytes: int) -> Check:
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return Check(False, f"cannot read free space: {exc}")
    text = f"{free // MIB} MB free, floor {min_free_bytes // MIB} MB"
    return Check(free > min_free_bytes, text if free > min_free_bytes else f"below floor: {text}")


def check_worker(
    heartbeat: float | None, max_age_seconds: float, now: float | None = None
) -> Check:
    """``heartbeat``: the worker's last ``time.monotonic()``; 0: starting; None: no worker."""
    if heartbeat is None:
        return Check(False, "no worker process (restarting after a failure, or stopping)")
    if heartbeat <= 0:
        return Check(False, "the worker is starting (loading the model)")
    age = (time.monotonic() if now is None else now) - heartbeat
    if age > max_age_seconds:
        return Check(False, f"heartbeat stale: last progress {age:.0f} s ago")
    return Check(True, f"heartbeat {age:.0f} s ago")


def model_summary(config: NodeConfig, runtime: str | None = None) -> dict[str, Any]:
    """Name, version, weights sha256 and runtime of the node's model (``error`` if unreadable).

    ``runtime`` is the runtime the node already resolved at start: resolving again would open
    and check a gated graph once more, in the process that serves the page."""
    from ctcovid.model.artifact import default_model_path, read_artifact
    from ctcovid.model.runtimes import resolve_runtime

    path = config.model or default_model_path()
    try:
        artifact = read_artifact(path)
        runtime = runtime or resolve_runtime(path, artifact, config.runtime).name
    except Exception as exc:  # shown as the failing check, with the reason
        return {"error": f"{path}: {exc}"}
    return {
        "name": artifact.name,
        "version": artifact.version,
        "sha256": artifact.weights_sha256,
        "runtime": runtime,
        "threshold": artifact.threshold,
    }


def check_model(summary: dict[str, Any]) -> Check:
    if "error" in summary:
        return Check(False, str(summary["error"]))
    return Check(
        True,
        f"{summary['name']} {summary['version']} ({summary['runtime']}, "
        f"sha256 {str(summary['sha256'])[:12]})",
    )


def _echo(config: NodeConfig) -> None:
    from ctcovid.net.dimse import DimseArchive
    from ctcovid.net.tls import client_ssl_context

    assert config.peer is not None
    context = None
    if config.send_tls:
        context = client_ssl_context(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
    archive = DimseArchive(
        config.peer,
        calling_ae_title=config.ae_title,
        timeout_seconds=DESTINATION_TIMEOUT_SECONDS,
        deadline_seconds=2 * DESTINATION_TIMEOUT_SECONDS,
        ssl_context=context,
    )
    try:
        archive.echo()
    finally:
        archive.close()


def _stow_reachable(config: NodeConfig) -> None:
    from ctcovid.net.dicomweb import STOW_AUTH_ENV, HttpAuth, make_session

    assert config.stow is not None
    auth = HttpAuth.load(STOW_AUTH_ENV, config.stow_auth_file)
    session = make_session(config.stow, auth, ca_file=config.stow_ca_file)
    try:
        response = session.get(config.stow, timeout=DESTINATION_TIMEOUT_SECONDS)
    finally:
        session.close()
    if response.status_code in (401, 403) or response.status_code >= 500:
        raise OSError(f"the STOW-RS service answered HTTP {response.status_code}")


@dataclass
class DestinationProbe:
    """The destination's state, asked at most every ``interval_seconds`` and cached."""

    config: NodeConfig
    interval_seconds: float = DESTINATION_CHECK_SECONDS
    ask: Callable[[NodeConfig], None] | None = None
    _last: Check | None = None
    _at: float = 0.0
    _checked_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self) -> Check:
        config = self.config
        if not config.sends:
            return Check(True, "no destination: SRs stay in the store")
        with self._lock:  # one question at a time; the others get its answer
            now = time.monotonic()
            if self._last is not None and now - self._at < self.interval_seconds:
                return self._last
            ask = self.ask or (_echo if config.peer is not None else _stow_reachable)
            what = "C-ECHO" if config.peer is not None else "HTTP"
            try:
                ask(config)
                result = Check(True, f"{config.sr_destination}: answered {what}")
            except Exception as exc:
                result = Check(False, f"{config.sr_destination}: {what} failed: {exc}")
            self._last, self._at, self._checked_at = result, time.monotonic(), time.time()
            return result

    @property
    def checked_at(self) -> float:
        """Wall-clock time of the last question (0: never asked)."""
        return self._checked_at
