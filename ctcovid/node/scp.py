"""The listener: a pynetdicom storage SCP that writes CT instances durably and answers C-ECHO.

Data sets arrive on disk (a spool file in the store's ``tmp`` folder) and only their UIDs are
parsed here; :mod:`ctcovid.net.guard` bounds what a peer can make the listener spend.

Handlers get their dependencies as arguments and answer with DICOM status codes; they never
raise, so nothing a peer sends can take the listener down. Storage statuses (PS3.4 B.2.3; the
conformance statement reads them from ``ctcovid.net.services.STORE_STATUSES``):

``0x0000``  stored (file fsynced and renamed, recorded in the job database)
``0xA700``  out of resources: below the free-space floor, the disk failed, or the data set is
            larger than ``max_instance_mb`` (received to disk up to that size, the rest dropped)
``0xA900``  data set does not match the SOP class (no pixel data, missing or mismatched UIDs)
``0xC210``  cannot understand: the data set could not be decoded
``0xC211``  cannot understand: a UID that is not a valid UID (nothing is written)
``0x0110``  processing failure: anything unexpected (logged with its traceback)
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE, evt

from ctcovid.dicom.uids import valid_uid
from ctcovid.net.guard import (
    SPOOL_PREFIX,
    GuardedServer,
    Limits,
    Spool,
    check_library,
    discard_spool,
    force_close,
)
from ctcovid.net.services import (
    MIB,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    STORAGE_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
)
from ctcovid.net.tls import server_ssl_context
from ctcovid.node.auditing import NodeAudit, note_received
from ctcovid.node.config import NodeConfig
from ctcovid.node.files import OutOfSpaceError
from ctcovid.node.store import Store

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The only elements the listener reads; everything else is skipped by the parser, so a data set
# of millions of tiny elements costs no memory here.
_IDENTITY_TAGS = [
    Tag(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientID",  # for the audit trail only; never logged
        "AccessionNumber",
        *_PIXEL_KEYWORDS,
    )
]


@dataclass
class ReceiveStats:
    """Counters of the listener, read by the metrics endpoint and the logs."""

    stored: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    # Associations rejected or connections cut, by reason (calling_aet_not_allowed, ...).
    rejected: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, status: int) -> None:
        with self.lock:
            if status == STATUS_SUCCESS:
                self.stored += 1
            else:
                self.refused[status] = self.refused.get(status, 0) + 1

    def count_rejected(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1


def _calling_aet(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return ""


def _peer_address(event: Any) -> str:
    try:
        return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
    except Exception:
        return ""


def _shown_uid(value: object) -> str:
    """A UID for a log line; anything that is not a UID (it may be patient data) is not shown."""
    text = str(value or "")
    return text if valid_uid(text) else "<invalid>"


# Parsing skips unwanted elements one read each; a data set of millions of tiny elements would
# keep a handler busy for minutes. An Enhanced CT of 1000 frames takes about a hundred reads.
MAX_HEADER_READS = 1_000_000


class HeaderBombError(ValueError):
    """A data set with more elements than :data:`MAX_HEADER_READS` allows to parse."""


class _CountedReads:
    """A binary file whose reads are counted; parsing stops past ``max_reads``."""

    def __init__(self, fh: Any, max_reads: int) -> None:
        self._fh = fh
        self._left = max_reads

    def read(self, *args: Any) -> bytes:
        self._left -= 1
        if self._left < 0:
            raise HeaderBombError(f"more than {MAX_HEADER_READS} elements to parse")
        return bytes(self._fh.read(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _read_identity(source: Path | bytes) -> Dataset:
    """The UIDs and whether pixel data is present; bulk values stay on disk (deferred)."""
    if isinstance(source, bytes):
        return dcmread(
            _CountedReads(io.BytesIO(source), MAX_HEADER_READS),  # type: ignore[arg-type]
            defer_size=4096,
            specific_tags=_IDENTITY_TAGS,
        )
    with open(source, "rb") as fh:
        return dcmread(
            _CountedReads(fh, MAX_HEADER_READS),  # type: ignore[arg-type]
            defer_size=4096,
            specific_tags=_IDENTITY_TAGS,
        )


def _accession_number(value: object) -> str:
    """AccessionNumber (SH: at most 16 characters) as text to keep; anything else is dropped."""
    text = str(value or "").strip()
    if len(text) > 16 or not text.isprintable():
        return ""
    return text


def _put(store: Store, source: Path | bytes, **identity: str) -> bool:
    """Store the received file; a spooled one is mapped, never read into memory whole."""
    if isinstance(source, bytes):
        return store.put_instance(source, **identity)
    with open(source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            return store.put_instance(view, **identity)  # type: ignore[arg-type]
        finally:
            # A slice still referenced keeps the mapping open until it is freed.
            with contextlib.suppress(BufferError):
                view.release()


def _refuse(status: int, calling: str, reason: str, **uids: str) -> int:
    fields = " ".join(f"{k}={v}" for k, v in uids.items())
    log = logger.error if status == STATUS_OUT_OF_RESOURCES else logger.warning
    log(
        "event=store_refused status=0x%04X calling_aet=%s %s reason=%r",
        status,
        calling,
        fields,
        reason,
    )
    return status


def _store_instance(event: Any, store: Store) -> int:
    """The body of the C-STORE handler; may raise, :func:`handle_store` guards it."""
    request = event.request
    calling = _calling_aet(event)
    request_sop = _shown_uid(getattr(request, "AffectedSOPInstanceUID", ""))
    spool = getattr(request, "_dataset_file", None)
    source: Path | bytes
    if isinstance(spool, Spool):
        spool.close()
        if spool.invalid_request:
            return _refuse(
                STATUS_INVALID_UID,
                calling,
                "the request's AffectedSOPClassUID or AffectedSOPInstanceUID is not a valid UID",
            )
        if spool.oversize:
            return _refuse(
                STATUS_OUT_OF_RESOURCES,
                calling,
                f"data set larger than max_instance_mb ({spool.max_bytes // MIB} MiB)",
                sop=request_sop,
            )
        if spool.error:
            return _refuse(STATUS_OUT_OF_RESOURCES, calling, spool.error, sop=request_sop)
        source = spool.path
    else:  # received in memory (a listener without the transport guard)
        source = event.encoded_dataset(include_meta=True)
    try:
        ds = _read_identity(source)
        sop_instance_uid = ds.get("SOPInstanceUID")
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
        sop_class_uid = ds.get("SOPClassUID")
        accession = _accession_number(ds.get("AccessionNumber"))
        has_pixels = any(kw in ds for kw in _PIXEL_KEYWORDS)
    except Exception as exc:  # pydicom raises many types on corrupt input
        # The exception's text may quote received values: its type is enough.
        reason = str(exc) if isinstance(exc, HeaderBombError) else type(exc).__name__
        return _refuse(STATUS_CANNOT_UNDERSTAND, calling, f"unreadable: {reason}", sop=request_sop)
    for value, attribute in (
        (sop_instance_uid, "SOPInstanceUID (0008,0018)"),
        (study_uid, "StudyInstanceUID (0020,000D)"),
        (series_uid, "SeriesInstanceUID (0020,000E)"),
    ):
        if value is None:
            return _refuse(STATUS_DATASET_MISMATCH, calling, f"lacks {attribute}", sop=request_sop)
        if not valid_uid(str(value)):
            return _refuse(
                STATUS_INVALID_UID,
                calling,
                f"{attribute} is not a valid UID (digits and dots, at most 64 characters)",
                sop=request_sop,
            )
    sop, study, series = str(sop_instance_uid), str(study_uid), str(series_uid)
    problem = ""
    if str(request.AffectedSOPInstanceUID) != sop:
        problem = "SOPInstanceUID differs from the request's AffectedSOPInstanceUID"
    elif str(sop_class_uid) != str(request.AffectedSOPClassUID):
        problem = (
            f"SOPClassUID {_shown_uid(sop_class_uid)} differs from the request's "
            f"AffectedSOPClassUID {_shown_uid(request.AffectedSOPClassUID)}"
        )
    elif not has_pixels:
        problem = "lacks PixelData (7FE0,0010)"
    if problem:
        return _refuse(
            STATUS_DATASET_MISMATCH, calling, problem, study=study, series=series, sop=sop
        )
    try:
        new = _put(
            store,
            source,
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=str(sop_class_uid),
            calling_aet=calling,
            accession_number=accession,
        )
    except OutOfSpaceError as exc:
        return _refuse(
            STATUS_OUT_OF_RESOURCES, calling, str(exc), study=study, series=series, sop=sop
        )
    except (OSError, sqlite3.Error) as exc:
        return _refuse(
            STATUS_OUT_OF_RESOURCES,
            calling,
            f"{type(exc).__name__}: {exc}",
            study=study,
            series=series,
            sop=sop,
        )
    note_received(event.assoc, study, str(ds.get("PatientID", "") or ""), str(sop_class_uid))
    logger.debug(
        "event=stored calling_aet=%s study=%s series=%s sop=%s new=%s",
        calling,
        study,
        series,
        sop,
        new,
    )
    return STATUS_SUCCESS


def handle_store(event: Any, store: Store, stats: ReceiveStats) -> int:
    """EVT_C_STORE: write the instance durably, then answer; never raises."""
    try:
        status = _store_instance(event, store)
    except Exception as exc:
        # The traceback's frames, not the exception's text (it may quote received values).
        logger.error(
            "event=store_error calling_aet=%s error=%s\n%s",
            _calling_aet(event),
            type(exc).__name__,
            "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
        )
        status = STATUS_PROCESSING_FAILURE
    stats.count(status)
    return status


def handle_echo(event: Any) -> int:
    """EVT_C_ECHO: the node is up."""
    logger.debug("event=echo calling_aet=%s", _calling_aet(event))
    return STATUS_SUCCESS


def handle_accepted(event: Any) -> None:
    logger.info(
        "event=association_accepted calling_aet=%s from=%s",
        _calling_aet(event),
        _peer_address(event),
    )


# A-ASSOCIATE-RJ (result source, diagnostic) -> reason (PS3.8 9.3.4).
REJECT_REASONS = {
    (1, 3): "calling_aet_not_allowed",
    (1, 7): "called_aet_not_recognised",
    (1, 2): "application_context_not_supported",
    (2, 2): "protocol_version_not_supported",
    (3, 1): "temporary_congestion",
    (3, 2): "too_many_associations",
}


def handle_rejected(event: Any, stats: ReceiveStats, on_refused: Any = None) -> None:
    """EVT_REJECTED: log who was turned away and why (never anything they sent but the AE)."""
    try:
        primitive = event.assoc.acceptor.primitive
        key = (int(primitive.result_source), int(primitive.diagnostic))
    except Exception:
        key = (0, 0)
    reason = REJECT_REASONS.get(key, "rejected")
    if on_refused is not None:  # the listener's: counts, logs and audits
        on_refused(reason, _peer_address(event), _calling_aet(event))
        return
    record_refusal(stats, reason, _peer_address(event), _calling_aet(event))


def record_refusal(stats: ReceiveStats, reason: str, address: str, calling: str) -> None:
    """Log and count an association rejected or a connection cut by the listener."""
    stats.count_rejected(reason)
    logger.warning(
        "event=association_rejected reason=%s from=%s calling_aet=%s", reason, address, calling
    )


def handle_released(event: Any) -> None:
    logger.debug("event=association_released calling_aet=%s", _calling_aet(event))


def handle_conn_closed(event: Any) -> None:
    """EVT_CONN_CLOSE: a C-STORE cut off half-way leaves no spool file behind."""
    discard_spool(event.assoc)


# The association handshake (A-ASSOCIATE-RQ to -AC) waits at most this long, or the network
# timeout when that is shorter.
MAX_ACSE_TIMEOUT_SECONDS = 30.0
# Connections (associations and TLS handshakes) beyond twice max_associations plus this many
# are closed at once: room for A-ASSOCIATE-RJ answers beyond the limit, and for handshakes.
EXTRA_CONNECTIONS = 8


def connection_limit(config: NodeConfig) -> int:
    """Connections the listener holds at once (see :data:`EXTRA_CONNECTIONS`)."""
    return 2 * config.max_associations + EXTRA_CONNECTIONS


def build_ae(config: NodeConfig) -> AE:
    """The application entity: CT storage and verification only, bounded and allow-listed."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_bytes
    ae.network_timeout = config.network_timeout_seconds
    ae.acse_timeout = min(MAX_ACSE_TIMEOUT_SECONDS, config.network_timeout_seconds)
    ae.dimse_timeout = config.network_timeout_seconds
    if config.allow_aet:
        # pynetdicom rejects any other calling AE at association (A-ASSOCIATE-RJ, reason 3).
        ae.require_calling_aet = list(config.allow_aet)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
    return ae


def transport_limits(config: NodeConfig, store: Store) -> Limits:
    """The listener's bounds on every connection (see :mod:`ctcovid.net.guard`)."""
    return Limits(
        network_timeout_seconds=config.network_timeout_seconds,
        max_pdu_bytes=config.max_pdu_bytes,
        max_instance_bytes=int(config.max_instance_mb * MIB),
        max_connections=connection_limit(config),
        spool_dir=store.files.tmp_dir,
        check_space=store.files.check_free_space,
        max_association_seconds=config.max_association_seconds,
        max_store_seconds=config.max_store_seconds,
        max_associations_per_address=config.max_associations_per_address,
    )


class Listener:
    """The running SCP: start, stop accepting, wait (bounded) for open associations to end."""

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        stats: ReceiveStats | None = None,
        audit: NodeAudit | None = None,
    ) -> None:
        self.config = config
        self.audit = audit
        self.store = store
        self.stats = stats or ReceiveStats()
        self.ae = build_ae(config)
        self.server: GuardedServer | None = None
        self._thread: threading.Thread | None = None

    def _clear_spools(self) -> None:
        """Spool files of a previous run (killed mid-transfer) are incomplete: delete them."""
        for path in self.store.files.tmp_dir.glob(f"{SPOOL_PREFIX}*"):
            try:
                path.unlink()
            except OSError:
                logger.warning("event=spool_not_removed path=%s", path)

    def _refused(self, reason: str, address: str, calling: str) -> None:
        record_refusal(self.stats, reason, address, calling)
        if self.audit is not None:
            self.audit.refused(reason, address, calling)

    def start(self) -> None:
        check_library()
        self._clear_spools()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [self.store, self.stats]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_REJECTED, handle_rejected, [self.stats, self._refused]),
            (evt.EVT_RELEASED, handle_released),
            (evt.EVT_CONN_CLOSE, handle_conn_closed),
            *(self.audit.handlers() if self.audit is not None else ()),
        ]
        server: GuardedServer = self.ae.make_server(  # type: ignore[assignment]
            (self.config.host, self.config.port),
            ssl_context=(
                server_ssl_context(
                    cert=self.config.tls_cert, key=self.config.tls_key, ca=self.config.tls_ca
                )
                if self.config.tls
                else None
            ),
            evt_handlers=handlers,
            server_class=GuardedServer,
            limits=transport_limits(self.config, self.store),
            on_refused=self._refused,
        )
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="ctcovid-accept", daemon=True
        )
        self._thread.start()
        logger.info(
            "event=listening ae_title=%s host=%s port=%d tls=%s client_certificates=%s "
            "allow_aet=%s max_associations=%d max_associations_per_address=%d "
            "network_timeout=%.0fs max_association_seconds=%.0f max_store_seconds=%.0f "
            "max_pdu_bytes=%d max_instance_mb=%.0f",
            self.config.ae_title,
            self.config.host,
            self.port,
            self.config.tls,
            self.config.tls_ca is not None,
            ",".join(self.config.allow_aet) or "*",
            self.config.max_associations,
            self.config.max_associations_per_address,
            self.config.network_timeout_seconds,
            self.config.max_association_seconds,
            self.config.max_store_seconds,
            self.config.max_pdu_bytes,
            self.config.max_instance_mb,
        )

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the OS picked for port 0)."""
        if self.server is None:
            return self.config.port
        return int(self.server.server_address[1])

    def stop(self, drain_seconds: float = 5.0) -> None:
        """Stop accepting, let open associations finish for ``drain_seconds``, then cut them.

        Returns within about ``drain_seconds + 3`` seconds whatever the peers do.
        """
        if self.server is None:
            return
        self.server.shutdown()
        self.server = None
        if self._thread is not None:
            self._thread.join(5)
        deadline = time.monotonic() + drain_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        remaining = self.ae.active_associations
        if remaining:
            logger.warning("event=associations_aborted count=%d", len(remaining))
            force_close(remaining, wait_seconds=2.0)
        logger.info("event=listener_stopped")
