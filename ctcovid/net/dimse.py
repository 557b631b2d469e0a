"""A PACS over DIMSE: C-FIND (Study Root) to list studies and series, C-GET or C-MOVE to fetch.

C-GET brings the instances back on the association ctcovid opened (the PACS needs to allow C-FIND
and C-GET for our AE title). PACS that refuse C-GET can send by C-MOVE instead: ctcovid then
listens as a storage SCP (``MoveReceiver``) under an AE title the PACS knows as a C-MOVE
destination. Nothing here sends a C-STORE to, or deletes from, the PACS.

A PACS is held to what the listener asks of a modality (:mod:`ctcovid.net.guard`): every PDU
must arrive whole within ``timeout_seconds`` and be no longer than the ``max_pdu_bytes`` we
offered; every association (C-ECHO, C-FIND, one series' C-GET or C-MOVE) ends within
``deadline_seconds`` or is aborted; a retrieved data set goes to a spool file as it arrives, at
most ``max_instance_mb`` of it, and is then moved into the cache, so memory does not grow with
the instance. The first instance refused (too large, cache full, cannot be written) aborts the
retrieval: what the PACS would send next is never read. Each of these is a
:class:`~ctcovid.errors.PacsError` naming the peer and what was asked.

Before a series is retrieved, an image-level C-FIND lists its instances: only those are
accepted (``0xC211`` otherwise), and a retrieval that did not deliver every one of them is
:class:`IncompleteRetrievalError`, with the counts, never a series judged as if whole.

Statuses (PS3.4 C.4): C-FIND pending 0xFF00/0xFF01 carry one match each and 0x0000 ends the
list; a C-GET or C-MOVE ending with 0x0000 delivered everything, 0xB000 delivered some (sub-
operations failed or were refused), anything else is a failure that raises
:class:`~ctcovid.errors.PacsError` naming the peer, the series and the status.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from ctcovid.dicom.uids import valid_uid
from ctcovid.errors import ConfigError, PacsError
from ctcovid.net.cache import CacheFullError
from ctcovid.net.guard import (
    GuardedServer,
    Limits,
    Spool,
    check_library,
    discard_spool,
    force_close,
    guard_association,
)
from ctcovid.net.peers import Peer
from ctcovid.net.query import (
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    HeldInstance,
    IncompleteRetrievalError,
    InstanceWriter,
    SeriesMatch,
    StudyMatch,
    accept_match,
    held_instances,
    series_match,
    study_match,
)
from ctcovid.net.services import (
    LOSSLESS_TRANSFER_SYNTAXES,
    LOSSY_DECODABLE_SYNTAXES,
    LOSSY_TRANSFER_SYNTAXES,
    MIB,
    STORAGE_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
)

logger = logging.getLogger(__name__)

PENDING = frozenset({0xFF00, 0xFF01})
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_NOT_EXPECTED = 0xC211  # an instance the image-level C-FIND did not announce
STATUS_WARNING = 0xB000
MAX_FIND_MATCHES = 100_000  # a PACS that answers without end is cut off, not followed
# As the listener's defaults (NodeConfig): what one PDU and one instance may take.
DEFAULT_MAX_PDU_BYTES = 262_144
DEFAULT_MAX_INSTANCE_MB = 1024.0
# One association: a C-FIND, or the C-GET/C-MOVE of one series (a 2 GB series at 1 MB/s fits).
DEFAULT_DEADLINE_SECONDS = 3600.0
# Proposed for C-ECHO, C-FIND, C-GET and C-MOVE (the requests and identifiers): pynetdicom's
# defaults in its order, less Deflated Explicit VR Little Endian: a peer's identifiers are never
# inflated here (a small deflated stream can expand without bound), as for every other service.
QUERY_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    ts for ts in DEFAULT_TRANSFER_SYNTAXES if ts != DeflatedExplicitVRLittleEndian
)
QUERY_RETRIEVE_CLASSES = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
# Values in a C-FIND identifier beyond ASCII go out as UTF-8, declared (PS3.5 6.1.2.3).
UTF8_CHARACTER_SET = "ISO_IR 192"
_REFUSAL_TEXT = {
    "peer_stalled": "sent no whole PDU within {timeout:g} s (stalled)",
    "pdu_too_large": "announced a PDU longer than the {max_pdu} bytes we accept",
    "command_too_large": "sent a DIMSE command set over the size limit",
    "dataset_too_large": "sent a response data set over the in-memory limit",
    "invalid_message": "sent a DIMSE message that does not decode",
}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


def _query_identifier(level: str, return_keys: tuple[str, ...], keys: dict[str, str]) -> Dataset:
    """A C-FIND identifier: ``keys`` as matching keys, ``return_keys`` asked for.

    An empty matching value means "any" in DICOM (PS3.4 C.2.2.2.1): ``StudyDate=`` would list
    every study of the archive, so it is refused with the key named. Non-ASCII values are
    sent as UTF-8 with Specific Character Set ISO_IR 192; without it the PACS would read them
    as ASCII and match nothing, or the wrong patient.
    """
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword in return_keys:
        setattr(query, keyword, "")
    for keyword, value in keys.items():
        if not str(value).strip():
            raise ConfigError(
                f"query key {keyword} has an empty value, which a PACS matches as 'any value' "
                f"(every study); give a value, e.g. {keyword}=..., or leave the key out"
            )
        setattr(query, keyword, value)
    if any(not str(value).isascii() for value in keys.values()):
        query.SpecificCharacterSet = UTF8_CHARACTER_SET
    return query


def encoded_query(level: str, keys: dict[str, str]) -> bytes:
    """The C-FIND identifier of a STUDY or SERIES query as sent, Explicit VR Little Endian (for
    the audit trail's ParticipantObjectQuery)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    return_keys = STUDY_RETURN_KEYS if level == "STUDY" else SERIES_RETURN_KEYS
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, _query_identifier(level, return_keys, keys))
    return bytes(buffer.getvalue())


class _Watch:
    """What happened to one association: the guard's refusal, the deadline passing."""

    def __init__(self) -> None:
        self.refusal = ""
        self.expired = False
        self.assoc: Any = None

    def refused(self, reason: str, address: str, calling: str) -> None:
        self.refusal = self.refusal or reason


class _BoundedAE(AE):
    """An AE whose requestor associations carry the listener's bounds on every PDU read.

    pynetdicom creates the association's socket in ``_create_socket``, before the first byte
    is read: the guard is installed there, so even the A-ASSOCIATE-AC is read with bounds
    (pynetdicom itself clears the socket's timeout after connecting and blocks in ``recv``).
    """

    def __init__(self, ae_title: str, limits: Limits, watch: _Watch, timeout_seconds: float):
        super().__init__(ae_title=ae_title)
        self._limits = limits
        self._watch = watch
        self.maximum_pdu_size = limits.max_pdu_bytes
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self, attr, timeout_seconds)

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> Any:
        sock = super()._create_socket(assoc, address, tls_args)
        guard_association(assoc, self._limits, self._watch.refused)
        self._watch.assoc = assoc
        return sock


def _abort_soon(assoc: Any) -> None:
    """Abort ``assoc`` from another thread: the caller may be the association's own handler.

    The requestor then waits for the next DIMSE message on the association's queue, which an
    abort does not fill: once the abort is done (and the association's reactor, which reads
    that queue too, has stopped), an empty message there ends that wait at once (pynetdicom
    reads it as "no response"), instead of after the whole DIMSE timeout.
    """

    def cancel() -> None:
        force_close([assoc])
        with contextlib.suppress(Exception):  # no DIMSE provider: nothing waits on it
            assoc.dimse.msg_queue.put((None, None))

    threading.Thread(target=cancel, name="ctcovid-cancel", daemon=True).start()


class _StoreTarget:
    """Where one retrieval's instances go: counted, checked against the announced list.

    ``expected`` holds the SOP Instance UIDs the image-level C-FIND announced (None: any
    instance of the series is taken). The first refusal calls ``on_refusal`` (which aborts
    the retrieval's association) and every later instance is refused unread.
    """

    def __init__(self, write: InstanceWriter, expected: frozenset[str] | None = None):
        self.write = write
        self.expected = expected
        self.stored_uids: set[str] = set()
        self.cache_full: CacheFullError | None = None
        self.error: str = ""
        self.unexpected = 0
        self.lossy = 0
        self.on_refusal: Callable[[], None] | None = None
        self._lock = threading.Lock()

    @property
    def stored(self) -> int:
        return len(self.stored_uids)

    def _refuse(self, status: int, error: str = "") -> int:
        self.error = self.error or error
        if self.on_refusal is not None:
            hook, self.on_refusal = self.on_refusal, None
            hook()
        return status

    def store(self, sop_instance_uid: str, data: bytes | Path, *, lossy: bool = False) -> int:
        with self._lock:
            if self.error or self.cache_full is not None:
                return STATUS_OUT_OF_RESOURCES  # cancelled: nothing more is written
            if self.expected is not None and sop_instance_uid not in self.expected:
                self.unexpected += 1
                logger.warning(
                    "instance %r was not announced by the C-FIND of its series: refused",
                    sop_instance_uid,
                )
                return STATUS_NOT_EXPECTED
            try:
                self.write(sop_instance_uid, data)
            except CacheFullError as exc:
                self.cache_full = exc
                return self._refuse(STATUS_OUT_OF_RESOURCES)
            except OSError as exc:
                return self._refuse(
                    STATUS_OUT_OF_RESOURCES, f"cannot write instance {sop_instance_uid}: {exc}"
                )
            except Exception as exc:  # an invalid UID or undecodable data: refuse, never raise
                return self._refuse(
                    STATUS_CANNOT_UNDERSTAND, f"instance {sop_instance_uid!r} refused: {exc}"
                )
            self.stored_uids.add(sop_instance_uid)
            self.lossy += lossy
            return 0x0000

    def receive(self, event: Any, max_instance_bytes: int) -> int:
        """The C-STORE handler's body: the data set is a spool file (or, unguarded, bytes)."""
        request = event.request
        uid = str(request.AffectedSOPInstanceUID or "")
        try:
            lossy = str(event.context.transfer_syntax) in LOSSY_TRANSFER_SYNTAXES
        except Exception:
            lossy = False
        spool = getattr(request, "_dataset_file", None)
        if not isinstance(spool, Spool):
            return self.store(uid, event.encoded_dataset(include_meta=True), lossy=lossy)
        try:
            spool.close()
            if spool.invalid_request:
                return self._refuse(
                    STATUS_NOT_EXPECTED,
                    f"a C-STORE whose AffectedSOPInstanceUID {uid[:70]!r} is not a valid UID",
                )
            if spool.oversize:
                return self._refuse(
                    STATUS_OUT_OF_RESOURCES,
                    f"instance {uid} is larger than max_instance_mb "
                    f"({max_instance_bytes / MIB:g} MiB)",
                )
            if spool.error:
                return self._refuse(
                    STATUS_OUT_OF_RESOURCES, f"cannot spool instance {uid}: {spool.error}"
                )
            return self.store(uid, spool.path, lossy=lossy)
        finally:
            spool.discard()  # already moved into the cache when stored


class DimseArchive:
    """Query and retrieve from ``peer`` as ``calling_ae_title`` (optionally over TLS).

    ``timeout_seconds`` bounds every network wait and the arrival of each whole PDU;
    ``deadline_seconds`` bounds each association, connection to release (a C-FIND, or the
    retrieval of one series). ``max_instance_mb`` is the listener's cap on one data set.
    Retrieved data sets are spooled in ``spool_dir`` (best on the cache's file system, so
    that an instance is renamed into the cache rather than copied; default: a private
    temporary folder, removed by :meth:`close`).
    """

    def __init__(
        self,
        peer: Peer,
        *,
        calling_ae_title: str = "CTCOVID",
        timeout_seconds: float = 60.0,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
        max_pdu_bytes: int = DEFAULT_MAX_PDU_BYTES,
        max_instance_mb: float = DEFAULT_MAX_INSTANCE_MB,
        spool_dir: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        move_receiver: MoveReceiver | None = None,
    ):
        for name, value in (
            ("timeout_seconds", timeout_seconds),
            ("deadline_seconds", deadline_seconds),
            ("max_pdu_bytes", max_pdu_bytes),
            ("max_instance_mb", max_instance_mb),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive. Received: {value}.")
        check_library()
        self.peer = peer
        self.calling_ae_title = calling_ae_title
        self.timeout_seconds = timeout_seconds
        self.deadline_seconds = deadline_seconds
        self.max_pdu_bytes = int(max_pdu_bytes)
        self.max_instance_bytes = int(max_instance_mb * MIB)
        self.ssl_context = ssl_context
        self.move_receiver = move_receiver
        self._spool_dir = spool_dir
        self._own_spool: tempfile.TemporaryDirectory[str] | None = None

    def describe(self) -> str:
        how = f"C-MOVE to {self.move_receiver.ae_title}" if self.move_receiver else "C-GET"
        tls = ", TLS" if self.ssl_context is not None else ""
        return f"dicom://{self.peer} as {self.calling_ae_title} ({how}{tls})"

    def identity(self) -> str:
        return f"dicom://{self.peer}"

    def close(self) -> None:
        if self.move_receiver is not None:
            self.move_receiver.close()
        if self._own_spool is not None:
            self._own_spool.cleanup()
            self._own_spool = None

    # -- associations ---------------------------------------------------------------------------

    @property
    def spool_dir(self) -> Path:
        if self._spool_dir is None:
            if self._own_spool is None:
                self._own_spool = tempfile.TemporaryDirectory(prefix="ctcovid-dimse-")
            return Path(self._own_spool.name)
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        return self._spool_dir

    def limits(self) -> Limits:
        """The listener's bounds, as applied to the associations we open."""
        return Limits(
            network_timeout_seconds=self.timeout_seconds,
            max_pdu_bytes=self.max_pdu_bytes,
            max_instance_bytes=self.max_instance_bytes,
            max_connections=1,
            spool_dir=self.spool_dir,
        )

    def _ae(self, watch: _Watch) -> _BoundedAE:
        return _BoundedAE(self.calling_ae_title, self.limits(), watch, self.timeout_seconds)

    @contextlib.contextmanager
    def _association(
        self, ae: _BoundedAE, watch: _Watch, what: str, **kwargs: Any
    ) -> Iterator[Any]:
        """An established association for ``what``, released (or aborted) on exit.

        A timer aborts it at the deadline whatever the library is waiting for; the guard's
        refusals and the deadline become the :class:`PacsError` the caller sees, naming the
        peer and ``what``.
        """

        def expire() -> None:
            watch.expired = True
            if watch.assoc is not None:
                force_close([watch.assoc])

        timer = threading.Timer(self.deadline_seconds, expire)
        timer.daemon = True
        timer.start()
        assoc = None
        try:
            try:
                assoc = self._associate(ae, **kwargs)
                yield assoc
            except PacsError as exc:
                problem = self._problem(watch, what)
                if problem:
                    raise PacsError(problem) from exc
                raise
            finally:
                if assoc is not None and assoc.is_established and not watch.expired:
                    assoc.release()
            problem = self._problem(watch, what)
            if problem:
                raise PacsError(problem)
        finally:
            timer.cancel()
            if watch.assoc is not None:
                discard_spool(watch.assoc)

    def _problem(self, watch: _Watch, what: str) -> str:
        if watch.expired:
            return (
                f"{self.peer}: {what} passed its deadline of {self.deadline_seconds:g} s; "
                "the association was aborted"
            )
        if watch.refusal:
            template = _REFUSAL_TEXT.get(watch.refusal, "broke the transport rules ({reason})")
            detail = template.format(
                timeout=self.timeout_seconds, max_pdu=self.max_pdu_bytes, reason=watch.refusal
            )
            return f"{self.peer}: {what}: the PACS {detail}; the association was aborted"
        return ""

    def _associate(self, ae: AE, **kwargs: Any) -> Any:
        tls_args = (self.ssl_context, self.peer.host) if self.ssl_context is not None else None
        try:
            assoc = ae.associate(
                self.peer.host,
                self.peer.port,
                ae_title=self.peer.ae_title,
                tls_args=tls_args,
                **kwargs,
            )
        except OSError as exc:  # TLS handshake failures surface here
            raise PacsError(f"cannot reach {self.peer}: {exc}") from exc
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            raise PacsError(f"association with {self.peer} {why}")
        return assoc

    # -- C-ECHO ---------------------------------------------------------------------------------

    def echo(self) -> None:
        """C-ECHO the PACS (a check that it answers us), under the same bounds."""
        watch = _Watch()
        ae = self._ae(watch)
        ae.add_requested_context(VERIFICATION, list(QUERY_TRANSFER_SYNTAXES))
        with self._association(ae, watch, "C-ECHO") as assoc:
            status = assoc.send_c_echo()
        code = int(status.Status) if status and "Status" in status else None
        if code != 0x0000:
            shown = "no response" if code is None else f"status 0x{code:04X}"
            raise PacsError(f"{self.peer} answered C-ECHO with {shown}")

    # -- C-FIND ---------------------------------------------------------------------------------

    def _find(self, identifier: Dataset, what: str) -> list[Dataset]:
        watch = _Watch()
        ae = self._ae(watch)
        ae.add_requested_context(
            StudyRootQueryRetrieveInformationModelFind, list(QUERY_TRANSFER_SYNTAXES)
        )
        matches: list[Dataset] = []
        final: int | None = None
        with self._association(ae, watch, f"C-FIND {what}") as assoc:
            for status, ds in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                if not status or "Status" not in status:
                    break  # timeout or abort: reported below
                code = int(status.Status)
                if code in PENDING:
                    if ds is not None:
                        matches.append(ds)
                    if len(matches) > MAX_FIND_MATCHES:
                        raise PacsError(
                            f"{self.peer}: C-FIND {what} returned more than {MAX_FIND_MATCHES} "
                            "matches; narrow the query (e.g. a shorter StudyDate range)"
                        )
                    continue
                final = code
                break
        if final is None:
            raise PacsError(f"{self.peer}: no final C-FIND response for {what} (timeout or abort)")
        if final != 0x0000:
            raise PacsError(f"{self.peer} answered C-FIND {what} with status 0x{final:04X}")
        return matches

    def find_studies(self, keys: dict[str, str]) -> list[StudyMatch]:
        query = _query_identifier("STUDY", STUDY_RETURN_KEYS, keys)
        shown = " ".join(f"{k}={v}" for k, v in keys.items())
        out = []
        for ds in self._find(query, f"studies ({shown})"):
            # Checked, not trusted: a valid UID, and every key the archive may have ignored.
            uid = accept_match(keys, ds, uid_keyword="StudyInstanceUID", source=str(self.peer))
            if not uid:
                continue
            out.append(study_match(uid, ds))
        return out

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        keys = {"StudyInstanceUID": study.study_instance_uid}
        query = _query_identifier("SERIES", SERIES_RETURN_KEYS, keys)
        out = []
        for ds in self._find(query, f"series of study {study.study_instance_uid}"):
            # A series of another study (an archive that ignores the key) is dropped here.
            uid = accept_match(keys, ds, uid_keyword="SeriesInstanceUID", source=str(self.peer))
            if not uid:
                continue
            out.append(series_match(study, uid, ds))
        return out

    def find_instances(self, series: SeriesMatch) -> Announced:
        """The instances of ``series`` by an image-level C-FIND: what a retrieval must bring."""
        query = _query_identifier(
            "IMAGE",
            ("SOPInstanceUID", "SOPClassUID"),
            {
                "StudyInstanceUID": series.study_instance_uid,
                "SeriesInstanceUID": series.series_instance_uid,
            },
        )
        taken: set[str] = set()
        others = 0
        for ds in self._find(query, f"instances of series {series.series_instance_uid}"):
            uid = _text(ds, "SOPInstanceUID")
            if not valid_uid(uid):
                raise PacsError(
                    f"{self.peer}: C-FIND of series {series.series_instance_uid} answered "
                    f"SOPInstanceUID {uid[:70]!r}, which is not a UID"
                )
            sop_class = _text(ds, "SOPClassUID")
            if sop_class and sop_class not in STORAGE_CLASSES:
                others += 1  # a dose report, a screenshot: not retrieved, not missed
            else:
                taken.add(uid)
        return Announced(frozenset(taken), others)

    def find_held(self, study_instance_uid: str, series_instance_uid: str) -> list[HeldInstance]:
        """The instances ``peer`` holds in one series, with their InstanceNumber (an image-level
        C-FIND): what a destination already has of an SR series."""
        keys = {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": series_instance_uid}
        query = _query_identifier("IMAGE", ("SOPInstanceUID", "InstanceNumber"), keys)
        found = self._find(query, f"instances of series {series_instance_uid}")
        return held_instances(study_instance_uid, series_instance_uid, found, str(self.peer))

    # -- C-GET / C-MOVE -------------------------------------------------------------------------

    def _series_identifier(self, series: SeriesMatch) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = series.study_instance_uid
        query.SeriesInstanceUID = series.series_instance_uid
        return query

    def retrieve_series(self, series: SeriesMatch, write: InstanceWriter) -> int:
        """Fetch every instance of ``series`` into ``write``; the number of instances received.

        Raises :class:`IncompleteRetrievalError` when an announced instance did not arrive.
        """
        announced = self.find_instances(series)
        target = _StoreTarget(write, announced.instances)
        what = f"retrieval of series {series.series_instance_uid}"
        if self.move_receiver is not None:
            with self.move_receiver.expecting(target):
                final = self._move(series, target, what)
        else:
            final = self._get(series, target, what)
        return self._check_retrieval(series, final, target, announced)

    def _get(self, series: SeriesMatch, target: _StoreTarget, what: str) -> Dataset | None:
        watch = _Watch()
        ae = self._ae(watch)
        ae.add_requested_context(
            StudyRootQueryRetrieveInformationModelGet, list(QUERY_TRANSFER_SYNTAXES)
        )
        # Lossless syntaxes in one context, lossy ones in another: a PACS picks from each
        # context separately, so an instance it holds losslessly never comes back lossy.
        for uid in STORAGE_CLASSES:
            ae.add_requested_context(uid, LOSSLESS_TRANSFER_SYNTAXES)
            if LOSSY_DECODABLE_SYNTAXES:
                ae.add_requested_context(uid, LOSSY_DECODABLE_SYNTAXES)
        roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
        handler = (evt.EVT_C_STORE, _on_store, [target, self.max_instance_bytes])
        with self._association(
            ae, watch, f"C-GET {what}", ext_neg=roles, evt_handlers=[handler]
        ) as assoc:
            target.on_refusal = lambda: _abort_soon(assoc)
            return _final_status(
                assoc.send_c_get(
                    self._series_identifier(series), StudyRootQueryRetrieveInformationModelGet
                )
            )

    def _move(self, series: SeriesMatch, target: _StoreTarget, what: str) -> Dataset | None:
        assert self.move_receiver is not None
        watch = _Watch()
        ae = self._ae(watch)
        ae.add_requested_context(
            StudyRootQueryRetrieveInformationModelMove, list(QUERY_TRANSFER_SYNTAXES)
        )
        with self._association(ae, watch, f"C-MOVE {what}") as assoc:
            target.on_refusal = lambda: _abort_soon(assoc)
            return _final_status(
                assoc.send_c_move(
                    self._series_identifier(series),
                    self.move_receiver.ae_title,
                    StudyRootQueryRetrieveInformationModelMove,
                )
            )

    def _check_retrieval(
        self,
        series: SeriesMatch,
        final: Dataset | None,
        target: _StoreTarget,
        announced: Announced,
    ) -> int:
        uid = series.series_instance_uid
        if target.cache_full is not None:
            raise target.cache_full
        if target.error:
            raise PacsError(f"series {uid} from {self.peer}: {target.error}")
        if final is None:
            raise PacsError(
                f"{self.peer}: retrieval of series {uid} ended without a final response "
                f"(timeout or abort) after {target.stored} instance(s)"
            )
        code = int(final.Status)
        failed = _int(final, "NumberOfFailedSuboperations") or 0
        if code not in (0x0000, STATUS_WARNING):
            comment = _text(final, "ErrorComment")
            raise PacsError(
                f"{self.peer} answered the retrieval of series {uid} with status 0x{code:04X}"
                + (f" ({comment})" if comment else "")
            )
        n_announced = len(announced.instances)
        missing = n_announced - len(target.stored_uids & announced.instances)
        # A warning is explained when its failed sub-operations are the instances we do not
        # take (other SOP classes) or refused as unannounced; otherwise something is missing.
        explained = 0 < failed <= announced.others + target.unexpected
        if missing or (code == STATUS_WARNING and not explained):
            raise IncompleteRetrievalError(
                f"{self.peer} delivered {target.stored} of the {n_announced} instance(s) its "
                f"C-FIND announced for series {uid} (final status 0x{code:04X}, {failed} failed "
                "sub-operation(s)); not classified as if whole",
                delivered=target.stored,
                announced=n_announced,
            )
        if target.stored == 0:
            raise PacsError(f"{self.peer} delivered no CT instance of series {uid}")
        if target.lossy:
            logger.warning(
                "%s: %d of %d instance(s) of series %s arrived in a lossy transfer syntax",
                self.peer,
                target.lossy,
                target.stored,
                uid,
            )
        return target.stored


@dataclass(frozen=True)
class Announced:
    """What an image-level C-FIND said a series holds: the instances we take (CT storage
    classes), and how many others (other SOP classes) it also holds."""

    instances: frozenset[str]
    others: int = 0


def _on_store(event: Any, target: _StoreTarget, max_instance_bytes: int) -> int:
    return target.receive(event, max_instance_bytes)


def _final_status(responses: Any) -> Dataset | None:
    for status, _ in responses:
        if not status or "Status" not in status:
            return None
        if int(status.Status) in PENDING:
            continue
        return status
    return None


class MoveReceiver:
    """A storage SCP that receives the instances a C-MOVE sends, with the listener's bounds.

    It listens on ``host:port`` (no default address: a PACS must reach it, and nothing else
    should), accepts associations only from ``allow_ae_titles`` (the PACS's AE title), and
    stores only instances whose SOP Instance UID the image-level C-FIND of a retrieval in
    progress announced (``0xC211`` otherwise). Every connection has the listener's
    :class:`~ctcovid.net.guard.Limits`: bounded PDUs and data sets spooled to disk, at most
    ``max_instance_mb`` each.
    """

    def __init__(
        self,
        ae_title: str,
        port: int,
        *,
        host: str,
        allow_ae_titles: tuple[str, ...],
        timeout_seconds: float = 60.0,
        max_pdu_bytes: int = DEFAULT_MAX_PDU_BYTES,
        max_instance_mb: float = DEFAULT_MAX_INSTANCE_MB,
        max_connections: int = 8,
        spool_dir: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if not allow_ae_titles:
            raise ConfigError("the C-MOVE receiver needs the PACS's AE title to accept")
        check_library()
        self.ae_title = ae_title
        self.allow_ae_titles = tuple(allow_ae_titles)
        self.max_instance_bytes = int(max_instance_mb * MIB)
        self._targets: dict[str, _StoreTarget] = {}
        self._unannounced = 0
        self._lock = threading.Lock()
        self._own_spool = None
        if spool_dir is None:
            self._own_spool = tempfile.mkdtemp(prefix="ctcovid-move-")
            spool_dir = Path(self._own_spool)
        spool_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = int(max_pdu_bytes)
        ae.network_timeout = timeout_seconds
        ae.acse_timeout = timeout_seconds
        ae.dimse_timeout = timeout_seconds
        ae.maximum_associations = max_connections
        ae.require_called_aet = True
        # pynetdicom rejects any other calling AE at association (A-ASSOCIATE-RJ).
        ae.require_calling_aet = list(self.allow_ae_titles)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        limits = Limits(
            network_timeout_seconds=timeout_seconds,
            max_pdu_bytes=int(max_pdu_bytes),
            max_instance_bytes=self.max_instance_bytes,
            max_connections=max_connections,
            spool_dir=spool_dir,
        )
        try:
            server = ae.make_server(
                (host, port),
                ssl_context=ssl_context,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
                server_class=GuardedServer,
                limits=limits,
                on_refused=self._refused,
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen for C-MOVE on {host}:{port}: {exc}") from exc
        self._server: GuardedServer = server  # type: ignore[assignment]
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ctcovid-move-receiver", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _refused(reason: str, address: str, calling: str) -> None:
        logger.warning(
            "event=move_receiver_refused reason=%s from=%s calling_aet=%s", reason, address, calling
        )

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        with self._lock:
            target = self._targets.get(uid)
        if target is None:
            with self._lock:
                self._unannounced += 1
            spool = getattr(event.request, "_dataset_file", None)
            if isinstance(spool, Spool):
                spool.discard()
            logger.warning(
                "event=move_store_refused sop=%r reason='not announced by a retrieval in progress'",
                uid[:70],
            )
            return STATUS_NOT_EXPECTED
        return target.receive(event, self.max_instance_bytes)

    @contextlib.contextmanager
    def expecting(self, target: _StoreTarget) -> Iterator[None]:
        """Accept the instances ``target`` expects while the block runs."""
        if target.expected is None:
            raise ValueError("a C-MOVE retrieval needs the announced instances")
        with self._lock:
            for uid in target.expected:
                self._targets[uid] = target
            refused_before = self._unannounced
        try:
            yield
        finally:
            with self._lock:
                for uid in target.expected:
                    if self._targets.get(uid) is target:
                        del self._targets[uid]
                # Refused here, they are the C-MOVE's failed sub-operations: not missing ones.
                target.unexpected += self._unannounced - refused_before

    def close(self) -> None:
        self._server.shutdown()
        if self._own_spool is not None:
            shutil.rmtree(self._own_spool, ignore_errors=True)
            self._own_spool = None
