"""A PACS over DIMSE: C-FIND (Study Root) to list studies and series, C-GET or C-MOVE to fetch.

C-GET brings the instances back on the association ctcovid opened (the PACS needs to allow C-FIND
and C-GET for our AE title). PACS that refuse C-GET can send by C-MOVE instead: ctcovid then
listens as a storage SCP (``MoveReceiver``) under an AE title the PACS knows as a C-MOVE
destination. Nothing here sends a C-STORE to, or deletes from, the PACS.

Statuses (PS3.4 C.4): C-FIND pending 0xFF00/0xFF01 carry one match each and 0x0000 ends the
list; a C-GET or C-MOVE ending with 0x0000 delivered everything, 0xB000 delivered some (sub-
operations failed or were refused), anything else is a failure that raises
:class:`~ctcovid.errors.PacsError` naming the peer, the series and the status.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from ctcovid.errors import PacsError
from ctcovid.net.cache import CacheFullError
from ctcovid.net.peers import Peer
from ctcovid.net.query import (
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    InstanceWriter,
    SeriesMatch,
    StudyMatch,
    accept_match,
)
from ctcovid.net.services import STORAGE_CLASSES, TRANSFER_SYNTAXES

logger = logging.getLogger(__name__)

PENDING = frozenset({0xFF00, 0xFF01})
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_NOT_EXPECTED = 0xC211  # an instance no retrieval of ours asked for (C-MOVE receiver)
MAX_FIND_MATCHES = 100_000  # a PACS that answers without end is cut off, not followed


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


class _StoreTarget:
    """Counts what a retrieval received and remembers why an instance was refused."""

    def __init__(self, write: InstanceWriter):
        self.write = write
        self.stored = 0
        self.cache_full: CacheFullError | None = None
        self.error: str = ""

    def store(self, sop_instance_uid: str, data: bytes) -> int:
        try:
            self.write(sop_instance_uid, data)
        except CacheFullError as exc:
            self.cache_full = exc
            return STATUS_OUT_OF_RESOURCES
        except OSError as exc:
            self.error = f"cannot write instance {sop_instance_uid}: {exc}"
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # an invalid UID or undecodable data: refuse, never raise
            self.error = f"instance {sop_instance_uid!r} refused: {exc}"
            return STATUS_CANNOT_UNDERSTAND
        self.stored += 1
        return 0x0000


def _on_get_store(event: Any, target: _StoreTarget) -> int:
    uid = str(event.request.AffectedSOPInstanceUID or "")
    return target.store(uid, event.encoded_dataset(include_meta=True))


class DimseArchive:
    """Query and retrieve from ``peer`` as ``calling_ae_title`` (optionally over TLS)."""

    def __init__(
        self,
        peer: Peer,
        *,
        calling_ae_title: str = "CTCOVID",
        timeout_seconds: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        move_receiver: MoveReceiver | None = None,
    ):
        self.peer = peer
        self.calling_ae_title = calling_ae_title
        self.timeout_seconds = timeout_seconds
        self.ssl_context = ssl_context
        self.move_receiver = move_receiver

    def describe(self) -> str:
        how = f"C-MOVE to {self.move_receiver.ae_title}" if self.move_receiver else "C-GET"
        return f"dicom://{self.peer} as {self.calling_ae_title} ({how})"

    def identity(self) -> str:
        return f"dicom://{self.peer}"

    def close(self) -> None:
        if self.move_receiver is not None:
            self.move_receiver.close()

    # -- associations ---------------------------------------------------------------------------

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, self.timeout_seconds)
        return ae

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

    # -- C-FIND ---------------------------------------------------------------------------------

    def _find(self, identifier: Dataset, what: str) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        matches: list[Dataset] = []
        final: int | None = None
        try:
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
        finally:
            if assoc.is_established:
                assoc.release()
        if final is None:
            raise PacsError(f"{self.peer}: no final C-FIND response for {what} (timeout or abort)")
        if final != 0x0000:
            raise PacsError(f"{self.peer} answered C-FIND {what} with status 0x{final:04X}")
        return matches

    def find_studies(self, keys: dict[str, str]) -> list[StudyMatch]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        for keyword in STUDY_RETURN_KEYS:
            setattr(query, keyword, "")
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        shown = " ".join(f"{k}={v}" for k, v in keys.items())
        out = []
        for ds in self._find(query, f"studies ({shown})"):
            # Checked, not trusted: a valid UID, and every key the archive may have ignored.
            uid = accept_match(keys, ds, uid_keyword="StudyInstanceUID", source=str(self.peer))
            if not uid:
                continue
            out.append(
                StudyMatch(
                    study_instance_uid=uid,
                    patient_id=_text(ds, "PatientID"),
                    accession_number=_text(ds, "AccessionNumber"),
                    study_date=_text(ds, "StudyDate"),
                )
            )
        return out

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study.study_instance_uid
        for keyword in SERIES_RETURN_KEYS:
            setattr(query, keyword, "")
        out = []
        for ds in self._find(query, f"series of study {study.study_instance_uid}"):
            uid = _text(ds, "SeriesInstanceUID")
            if not uid:
                continue
            out.append(
                SeriesMatch(
                    study_instance_uid=study.study_instance_uid,
                    series_instance_uid=uid,
                    patient_id=study.patient_id,
                    modality=_text(ds, "Modality"),
                    series_description=_text(ds, "SeriesDescription"),
                    body_part=_text(ds, "BodyPartExamined"),
                    n_instances=_int(ds, "NumberOfSeriesRelatedInstances"),
                )
            )
        return out

    # -- C-GET / C-MOVE -------------------------------------------------------------------------

    def _series_identifier(self, series: SeriesMatch) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = series.study_instance_uid
        query.SeriesInstanceUID = series.series_instance_uid
        return query

    def retrieve_series(self, series: SeriesMatch, write: InstanceWriter) -> int:
        """Fetch every instance of ``series`` into ``write``; the number of instances received."""
        target = _StoreTarget(write)
        if self.move_receiver is not None:
            with self.move_receiver.expecting(series.series_instance_uid, target):
                final = self._move(series)
        else:
            final = self._get(series, target)
        return self._check_retrieval(series, final, target)

    def _get(self, series: SeriesMatch, target: _StoreTarget) -> Dataset | None:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in STORAGE_CLASSES:
            ae.add_requested_context(uid, TRANSFER_SYNTAXES)
        roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
        assoc = self._associate(
            ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, _on_get_store, [target])]
        )
        return self._final_status(
            assoc.send_c_get(
                self._series_identifier(series), StudyRootQueryRetrieveInformationModelGet
            ),
            assoc,
        )

    def _move(self, series: SeriesMatch) -> Dataset | None:
        assert self.move_receiver is not None
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae)
        return self._final_status(
            assoc.send_c_move(
                self._series_identifier(series),
                self.move_receiver.ae_title,
                StudyRootQueryRetrieveInformationModelMove,
            ),
            assoc,
        )

    @staticmethod
    def _final_status(responses: Any, assoc: Any) -> Dataset | None:
        final = None
        try:
            for status, _ in responses:
                if not status or "Status" not in status:
                    break
                if int(status.Status) in PENDING:
                    continue
                final = status
                break
        finally:
            if assoc.is_established:
                assoc.release()
        return final

    def _check_retrieval(
        self, series: SeriesMatch, final: Dataset | None, target: _StoreTarget
    ) -> int:
        uid = series.series_instance_uid
        if target.cache_full is not None:
            raise target.cache_full
        if final is None:
            raise PacsError(
                f"{self.peer}: retrieval of series {uid} ended without a final response "
                f"(timeout or abort) after {target.stored} instance(s)"
            )
        code = int(final.Status)
        failed = _int(final, "NumberOfFailedSuboperations") or 0
        if code not in (0x0000, 0xB000):
            comment = _text(final, "ErrorComment")
            raise PacsError(
                f"{self.peer} answered the retrieval of series {uid} with status 0x{code:04X}"
                + (f" ({comment})" if comment else "")
            )
        if target.error:
            raise PacsError(f"series {uid} from {self.peer}: {target.error}")
        if code == 0xB000 or failed:
            # Typically instances of SOP classes we do not take (not CT): they could not be
            # classified anyway; the series is judged on what arrived.
            logger.warning(
                "%s: %d instance(s) of series %s were not delivered (status 0x%04X)",
                self.peer,
                failed,
                uid,
                code,
            )
        if target.stored == 0:
            raise PacsError(f"{self.peer} delivered no CT instance of series {uid}")
        return target.stored


class MoveReceiver:
    """A storage SCP that receives the instances a C-MOVE sends, routed by SeriesInstanceUID.

    Only instances of a series a retrieval is waiting for are accepted (``0xC211`` otherwise),
    so the receiver cannot be used to fill the cache from outside.
    """

    def __init__(self, ae_title: str, port: int, *, host: str = "0.0.0.0"):
        self.ae_title = ae_title
        self._targets: dict[str, _StoreTarget] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        server = ae.start_server(
            (host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None  # block=False returns the running server
        self._server = server
        self.port = int(self._server.server_address[1])

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            series_uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception:
            return STATUS_CANNOT_UNDERSTAND
        with self._lock:
            target = self._targets.get(series_uid)
        if target is None:
            return STATUS_NOT_EXPECTED
        uid = str(event.request.AffectedSOPInstanceUID or "")
        return target.store(uid, event.encoded_dataset(include_meta=True))

    def expecting(self, series_uid: str, target: _StoreTarget) -> Any:
        receiver = self

        class _Expect:
            def __enter__(self) -> None:
                with receiver._lock:
                    receiver._targets[series_uid] = target

            def __exit__(self, *exc: object) -> None:
                with receiver._lock:
                    receiver._targets.pop(series_uid, None)

        return _Expect()

    def close(self) -> None:
        self._server.shutdown()
