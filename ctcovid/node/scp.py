"""The listener: a pynetdicom storage SCP that writes CT instances durably and answers C-ECHO.

Handlers get their dependencies as arguments and answer with DICOM status codes; they never
raise, so nothing a peer sends can take the listener down. Storage statuses (PS3.4 B.2.3):

``0x0000``  stored (file fsynced and renamed, recorded in the job database)
``0xA700``  out of resources: below the free-space floor, or the disk failed
``0xA900``  data set does not match the SOP class (no pixel data, missing or mismatched UIDs)
``0xC210``  cannot understand: the data set could not be decoded
``0xC211``  cannot understand: a UID that is not a valid UID (nothing is written)
``0x0110``  processing failure: anything unexpected (logged with its traceback)
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import CTImageStorage, EnhancedCTImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.transport import ThreadedAssociationServer

from ctcovid.node.config import NodeConfig
from ctcovid.node.store import InvalidUidError, OutOfSpaceError, Store, check_uid

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC211
STATUS_PROCESSING_FAILURE = 0x0110

STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
VERIFICATION = "1.2.840.10008.1.1"
# pynetdicom accepts, from one proposed context, the first syntax in *our* order. Explicit VR
# first keeps the VRs of private elements, which Implicit VR (the library's first) would lose.
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1"] + [
    uid for uid in ALL_TRANSFER_SYNTAXES if uid != "1.2.840.10008.1.2.1"
]
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class ReceiveStats:
    """Counters of the listener, read by the metrics endpoint and the logs."""

    stored: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, status: int) -> None:
        with self.lock:
            if status == STATUS_SUCCESS:
                self.stored += 1
            else:
                self.refused[status] = self.refused.get(status, 0) + 1


def _calling_aet(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return ""


def _store_instance(event: Any, store: Store) -> int:
    """The body of the C-STORE handler; may raise, :func:`handle_store` guards it."""
    request = event.request
    calling = _calling_aet(event)
    try:
        ds = event.dataset
        sop_instance_uid = ds.get("SOPInstanceUID")
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
        sop_class_uid = ds.get("SOPClassUID")
        has_pixels = any(kw in ds for kw in _PIXEL_KEYWORDS)
    except Exception as exc:  # pydicom raises many types on corrupt input
        logger.warning(
            "event=store_refused status=0xC210 calling_aet=%s sop=%.64r error=%s: %s",
            calling,
            str(getattr(request, "AffectedSOPInstanceUID", "")),
            type(exc).__name__,
            exc,
        )
        return STATUS_CANNOT_UNDERSTAND
    try:
        sop = check_uid(str(sop_instance_uid or ""), "SOPInstanceUID (0008,0018)")
        study = check_uid(str(study_uid or ""), "StudyInstanceUID (0020,000D)")
        series = check_uid(str(series_uid or ""), "SeriesInstanceUID (0020,000E)")
    except InvalidUidError as exc:
        missing = sop_instance_uid is None or study_uid is None or series_uid is None
        status = STATUS_DATASET_MISMATCH if missing else STATUS_INVALID_UID
        logger.warning(
            "event=store_refused status=0x%04X calling_aet=%s reason=%s", status, calling, exc
        )
        return status
    problem = ""
    if str(request.AffectedSOPInstanceUID) != sop:
        problem = (
            f"SOPInstanceUID {sop} differs from the request's AffectedSOPInstanceUID "
            f"{str(request.AffectedSOPInstanceUID)[:64]!r}"
        )
    elif str(sop_class_uid) != str(request.AffectedSOPClassUID):
        problem = (
            f"SOPClassUID {str(sop_class_uid)[:64]!r} differs from the request's "
            f"AffectedSOPClassUID {request.AffectedSOPClassUID}"
        )
    elif not has_pixels:
        problem = "lacks PixelData (7FE0,0010)"
    if problem:
        logger.warning(
            "event=store_refused status=0xA900 calling_aet=%s study=%s series=%s sop=%s reason=%r",
            calling,
            study,
            series,
            sop,
            problem,
        )
        return STATUS_DATASET_MISMATCH
    try:
        new = store.put_instance(
            event.encoded_dataset(include_meta=True),
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=str(sop_class_uid),
            calling_aet=calling,
        )
    except OutOfSpaceError as exc:
        logger.error(
            "event=store_refused status=0xA700 study=%s series=%s sop=%s reason=%r",
            study,
            series,
            sop,
            str(exc),
        )
        return STATUS_OUT_OF_RESOURCES
    except (OSError, sqlite3.Error) as exc:
        logger.error(
            "event=store_refused status=0xA700 study=%s series=%s sop=%s error=%s: %s",
            study,
            series,
            sop,
            type(exc).__name__,
            exc,
        )
        return STATUS_OUT_OF_RESOURCES
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
    except Exception:
        logger.exception("event=store_error calling_aet=%s", _calling_aet(event))
        status = STATUS_PROCESSING_FAILURE
    stats.count(status)
    return status


def handle_echo(event: Any) -> int:
    """EVT_C_ECHO: the node is up."""
    logger.debug("event=echo calling_aet=%s", _calling_aet(event))
    return STATUS_SUCCESS


def handle_accepted(event: Any) -> None:
    try:
        address = event.assoc.requestor.address
        logger.info(
            "event=association_accepted calling_aet=%s from=%s", _calling_aet(event), address
        )
    except Exception:  # logging must never break an association
        pass


def handle_released(event: Any) -> None:
    logger.debug("event=association_released calling_aet=%s", _calling_aet(event))


def server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    """TLS for receiving: our certificate; with a CA, callers must show a certificate it signed."""
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    if config.tls_ca is not None:
        context.load_verify_locations(cafile=str(config.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def build_ae(config: NodeConfig) -> AE:
    """The application entity: CT storage and verification only, bounded and allow-listed."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_bytes
    ae.network_timeout = config.network_timeout_seconds
    ae.acse_timeout = min(30.0, config.network_timeout_seconds)
    ae.dimse_timeout = config.network_timeout_seconds
    if config.allow_aet:
        # pynetdicom rejects any other calling AE at association (A-ASSOCIATE-RJ, reason 3).
        ae.require_calling_aet = list(config.allow_aet)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
    return ae


class Listener:
    """The running SCP: start, stop accepting, wait for open associations to end."""

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        stats: ReceiveStats | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.stats = stats or ReceiveStats()
        self.ae = build_ae(config)
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [self.store, self.stats]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_RELEASED, handle_released),
        ]
        self.server = self.ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            ssl_context=server_ssl_context(self.config),
            evt_handlers=handlers,
        )
        logger.info(
            "event=listening ae_title=%s host=%s port=%d tls=%s allow_aet=%s max_associations=%d",
            self.config.ae_title,
            self.config.host,
            self.port,
            self.config.tls,
            ",".join(self.config.allow_aet) or "*",
            self.config.max_associations,
        )

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the OS picked for port 0)."""
        if self.server is None:
            return self.config.port
        return int(self.server.server_address[1])

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting associations, let open ones finish (bounded), then abort the rest."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server = None
        deadline = time.monotonic() + drain_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.ae.active_associations:
            logger.warning("event=associations_aborted count=%d", len(self.ae.active_associations))
        self.ae.shutdown()
        logger.info("event=listener_stopped")
