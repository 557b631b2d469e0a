"""The audit messages of a batch run (see :mod:`ctcovid.audit`): start and stop, each query of a
PACS (C-FIND or QIDO-RS), each series retrieval (C-GET, C-MOVE or WADO-RS: Begin Transferring,
then Instances Transferred), each SR sent (Instances Transferred) and the export of results that
identify patients.

The run's spool is ``OUT/audit-spool``; what the repository did not take before the run ended
stays there and goes first at the next run with the same ``--out``.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from ctcovid import audit
from ctcovid.audit import AuditTrail, Participant
from ctcovid.net.mllp import Hl7Settings
from ctcovid.net.query import SERIES_RETURN_KEYS, STUDY_RETURN_KEYS, SeriesMatch
from ctcovid.net.sender import SendSettings

logger = logging.getLogger(__name__)

SPOOL_DIR = "audit-spool"
SOURCE_ID = "ctcovid batch"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class BatchAudit:
    """One batch run's :class:`AuditTrail`, with one method per event it records."""

    def __init__(
        self,
        out: Path,
        *,
        file: Path | None,
        syslog: str | None,
        ca: Path | None,
    ) -> None:
        self.trail = AuditTrail(
            source_id=SOURCE_ID,
            file=file,
            syslog=syslog,
            ca=ca,
            spool_dir=Path(out) / SPOOL_DIR,
            deliver=True,
        )
        self.me = self.trail.me

    def close(self, flush_seconds: float = 10.0) -> None:
        self.trail.close(flush_seconds)

    def activity(self, *, started: bool) -> None:
        try:
            user: str | None = getpass.getuser()
        except Exception:
            user = None
        self.trail.emit(
            audit.application_activity_message(
                self.me, self.trail.source_id, started=started, user=user
            )
        )

    def _archive(self, archive: Any) -> Participant:
        peer = getattr(archive, "peer", None)
        if peer is not None:  # DIMSE
            return Participant(peer.ae_title, False, None, peer.host)
        url = str(getattr(archive, "url", archive.identity()))
        return Participant(url, False, None, url)

    def _me(self, archive: Any) -> Participant:
        calling = getattr(archive, "calling_ae_title", None)
        if calling:
            return Participant(calling, True, audit.ROLE_APPLICATION, self.me.address)
        return Participant(self.me.user_id, True, audit.ROLE_APPLICATION, self.me.address)

    def query(
        self, archive: Any, level: str, keys: dict[str, str], *, error: str | None = None
    ) -> None:
        """Query: one C-FIND (the identifier, encoded) or QIDO-RS search (its query string)."""
        if getattr(archive, "peer", None) is not None:
            from ctcovid.net.dimse import encoded_query

            try:
                payload = encoded_query(level, keys)
            except Exception:
                payload = urlencode(keys).encode()
            object_id, id_type, syntax = (
                STUDY_ROOT_FIND,
                audit.ID_SOP_CLASS,
                (EXPLICIT_VR_LITTLE_ENDIAN),
            )
        else:
            url = str(getattr(archive, "url", archive.identity()))
            if level == "STUDY":
                fields = [*STUDY_RETURN_KEYS, *keys]
                params = [(k, v.replace("\\", ",")) for k, v in keys.items()]
                object_id = f"{url}/studies"
            else:
                fields = [*SERIES_RETURN_KEYS, "StudyInstanceUID"]
                params = []
                object_id = f"{url}/studies/{keys.get('StudyInstanceUID', '')}/series"
            params += [("includefield", f) for f in dict.fromkeys(fields)]
            payload = urlencode(params).encode()
            id_type, syntax = audit.ID_URI, None
        self.trail.emit(
            audit.query_message(
                self._me(archive),
                self._archive(archive),
                self.trail.source_id,
                query=payload,
                object_id=object_id,
                id_type=id_type,
                transfer_syntax=syntax,
                outcome=audit.SERIOUS_FAILURE if error else audit.SUCCESS,
                description=error,
            ),
            failure=error is not None,
        )

    def transfer(
        self,
        archive: Any,
        series: SeriesMatch,
        *,
        begun: bool,
        n_instances: int = 0,
        error: str | None = None,
    ) -> None:
        """Begin Transferring (``begun``) or Instances Transferred for one series retrieval."""
        source = self._archive(archive)
        source = Participant(source.user_id, False, audit.ROLE_SOURCE, source.address)
        me = self._me(archive)
        destination = Participant(me.user_id, True, audit.ROLE_DESTINATION, me.address)
        self.trail.emit(
            audit.transfer_message(
                audit.BEGIN_TRANSFERRING if begun else audit.INSTANCES_TRANSFERRED,
                source=source,
                destination=destination,
                source_id=self.trail.source_id,
                study_uid=series.study_instance_uid,
                patient_id=series.patient_id or "",
                sop_classes={} if begun else {CT_IMAGE_STORAGE: n_instances},
                action="E" if begun else "C",
                outcome=audit.SERIOUS_FAILURE if error else audit.SUCCESS,
                description=error,
            ),
            failure=error is not None,
        )

    def sr_sent(
        self, settings: SendSettings | Hl7Settings, sr: Any, *, failure: str | None = None
    ) -> None:
        """Instances Transferred: an SR sent to a ``--send-to`` or ``--stow`` destination (or
        given up on); Export for the ORU of an SR sent to the RIS (``--hl7``)."""
        if isinstance(settings, Hl7Settings):
            self.trail.emit(
                audit.oru_sent_message(
                    me=Participant(self.me.user_id, True, audit.ROLE_SOURCE, self.me.address),
                    ris=settings.mllp.uri,
                    source_id=self.trail.source_id,
                    study_uid=str(sr.get("StudyInstanceUID", "")),
                    patient_id=str(sr.get("PatientID", "")),
                    sop_class_uid=str(sr.get("SOPClassUID", "")),
                    failure=failure,
                ),
                failure=failure is not None,
            )
            return
        peer = settings.peer
        self.trail.emit(
            audit.sr_sent_message(
                source=Participant(
                    settings.calling_ae_title, True, audit.ROLE_SOURCE, self.me.address
                ),
                source_id=self.trail.source_id,
                peer=(peer.ae_title, peer.host) if peer is not None else None,
                url=settings.stow_url,
                study_uid=str(sr.get("StudyInstanceUID", "")),
                patient_id=str(sr.get("PatientID", "")),
                sop_class_uid=str(sr.get("SOPClassUID", "")),
                failure=failure,
            ),
            failure=failure is not None,
        )

    def export(self, path: Path, rows: Iterable[Any]) -> None:
        """Export: ``path`` (results that name patients by ID) written."""
        rows = list(rows)
        patients = {r.patient_id for r in rows if r.patient_id}
        if not patients:
            return
        where = str(Path(path).resolve())
        media = Participant(where, False, audit.ROLE_DESTINATION_MEDIA, where)
        self.trail.emit(
            audit.export_message(
                Participant(self.me.user_id, True, audit.ROLE_APPLICATION, self.me.address),
                media,
                self.trail.source_id,
                patients=patients,
                studies={r.study_instance_uid for r in rows},
            )
        )


def batch_audit(
    out: Path, *, file: Path | None, syslog: str | None, ca: Path | None
) -> BatchAudit | None:
    """The run's audit trail, or None when neither ``file`` nor ``syslog`` is given."""
    if file is None and not syslog:
        return None
    return BatchAudit(out, file=file, syslog=syslog, ca=ca)
