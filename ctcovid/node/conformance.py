"""The DICOM Conformance Statement (PS3.2) of this installation, made from the code's constants.

Every table is read from what the code itself uses: the listener's application entity as
:func:`ctcovid.node.scp.build_ae` makes it for the configuration (SOP classes, transfer syntaxes
in order of preference, AE titles, PDU size, association limit, timeouts, implementation class
UID and version name), the statuses of :mod:`ctcovid.net.services`, the limits of
:mod:`ctcovid.net.guard`, the SR sender's and the PACS client's proposals
(:mod:`ctcovid.net.sender`, :mod:`ctcovid.net.dimse`, :mod:`ctcovid.net.wado`), the coded
concepts of :mod:`ctcovid.report.codes` and the settings of :class:`NodeConfig`. So the statement
cannot drift from what the node does.

:func:`conformance_statement` builds the document once as sections (paragraphs, bullet lists and
tables) plus a machine-readable dictionary; :func:`to_markdown`, :func:`to_html` and
:func:`to_json` render that one structure.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.charset import python_encoding
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import UID, Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from ctcovid import __version__
from ctcovid.audit import APP_NAME, DEFAULT_MAX_SPOOL, MSGID
from ctcovid.dicom.modules import COPIED_MODULES
from ctcovid.net import guard
from ctcovid.net.dicomweb import AUTH_ENV, STOW_AUTH_ENV
from ctcovid.net.dimse import (
    DEFAULT_DEADLINE_SECONDS,
    MAX_FIND_MATCHES,
    QUERY_RETRIEVE_CLASSES,
    QUERY_TRANSFER_SYNTAXES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_NOT_EXPECTED,
    STATUS_OUT_OF_RESOURCES,
    UTF8_CHARACTER_SET,
)
from ctcovid.net.query import SERIES_RETURN_KEYS, STUDY_RETURN_KEYS
from ctcovid.net.sender import DELIVERED_STATUSES, SR_TRANSFER_SYNTAXES
from ctcovid.net.services import (
    DEFLATED_TRANSFER_SYNTAXES,
    LOSSLESS_TRANSFER_SYNTAXES,
    LOSSY_DECODABLE_SYNTAXES,
    STATUS_SUCCESS,
    STORAGE_CLASSES,
    STORE_STATUSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
)
from ctcovid.net.stow import RETRYABLE_HTTP
from ctcovid.net.tls import MINIMUM_TLS_VERSION
from ctcovid.net.wado import accept_header
from ctcovid.node.auditing import EVENTS as AUDIT_EVENTS
from ctcovid.node.auditing import SPOOL_DIR as AUDIT_SPOOL_DIR
from ctcovid.node.config import UNCONFIGURED_STORE, NodeConfig, load_settings
from ctcovid.node.scp import (
    MAX_HEADER_READS,
    REJECT_REASONS,
    build_ae,
    connection_limit,
)
from ctcovid.node.service import LISTENER_DRAIN_SECONDS
from ctcovid.report import codes
from ctcovid.report.card import CARD_SERIES_DESCRIPTION, PRELIMINARY
from ctcovid.report.equipment import MANUFACTURER, MANUFACTURER_MODEL_NAME
from ctcovid.report.header import (
    CARD_SERIES_NUMBER,
    HEATMAP_SERIES_NUMBER,
    SERIES_NUMBER_SPAN,
    SR_SERIES_NUMBER,
)
from ctcovid.report.heatmap import HEATMAP_SERIES_DESCRIPTION
from ctcovid.report.sr import SR_SERIES_DESCRIPTION, TRACKING_IDENTIFIER

FORMATS = ("markdown", "html", "json")
# The store is required to run a node, not to describe one.

# Application entities, by the id the JSON names them with.
LISTENER = "storage-scp"
SR_SENDER = "sr-storage-scu"
PACS_CLIENT = "query-retrieve-scu"
MOVE_RECEIVER = "move-storage-scp"
DICOMWEB = "dicomweb-user-agent"

# PS3.8 9.3.3.2: results of a presentation context the listener does not accept.
CONTEXT_REJECTIONS = (
    ("0x03", "abstract syntax not supported", "any SOP class not listed for the listener"),
    (
        "0x04",
        "transfer syntaxes not supported",
        "none of the proposed transfer syntaxes is among those listed for the SOP class",
    ),
)

_SETTINGS: dict[str, str] = {
    "store": "folder for received instances, SRs and the job database",
    "port": "TCP port of the listener",
    "host": "address the listener binds",
    "ae_title": "the node's AE title (called by senders, calling when it sends SRs)",
    "peer": "where SRs go by C-STORE, HOST:PORT:AET",
    "stow": "DICOMweb base URL SRs go to by STOW-RS instead of C-STORE",
    "stow_auth_file": f"STOW-RS credentials file (default: ${STOW_AUTH_ENV})",
    "stow_ca_file": "CA the STOW-RS server's certificate must be signed by",
    "model": "model folder",
    "allow_aet": "calling AE titles allowed to associate (empty: any)",
    "stable_seconds": "quiet time after the last instance before a series is complete",
    "retry_seconds": "first wait before an SR is sent again; doubles each attempt",
    "max_retry_seconds": "longest wait between send attempts",
    "max_attempts": "send attempts before a job is failed",
    "max_associations": "associations served at once; more are rejected",
    "max_pdu_bytes": "maximum PDU length offered and accepted",
    "min_free_mb": "free disk below which instances are refused (0xA700)",
    "network_timeout_seconds": "each PDU must arrive whole within this time; DIMSE timeout",
    "max_association_seconds": "wall-clock cap on one association",
    "max_store_seconds": "wall-clock cap on one C-STORE message",
    "max_associations_per_address": "associations one peer address may hold at once",
    "max_instance_mb": "largest data set accepted (0xA700 beyond)",
    "send_deadline_seconds": "whole send of one SR (default: three network timeouts)",
    "worker_stall_seconds": "a worker silent this long is killed and restarted",
    "decoder_memory_mb": "address-space limit of the decoder process (0: none)",
    "prefetch": "decode the next waiting series while the model scores this one (one ahead)",
    "tls_cert": "the node's TLS certificate (TLS on when given)",
    "tls_key": "the key of tls_cert",
    "tls_ca": "CA callers' certificates must be signed by (client certificates required)",
    "peer_tls": "TLS towards the peer (default: as for receiving)",
    "http_port": "port of the node's HTTP server: status page, JSON API, probes, /metrics "
    "(none: off)",
    "http_host": "address the HTTP server binds (beyond loopback: TLS and credentials)",
    "http_tls_cert": "the HTTP server's TLS certificate",
    "http_tls_key": "the key of http_tls_cert",
    "http_auth_file": "users (scrypt hashes) and API tokens (sha256) of the HTTP server",
    "http_show_phi": "show patient name, ID and birth date on the page and in the API",
    "metrics_port": "deprecated alias of http_port",
    "metrics_host": "deprecated alias of http_host",
    "poll_seconds": "how often the worker looks for work",
    "batch_size": "slices decoded ahead of the model",
    "runtime": "how the model runs: auto, keras, onnx, int8, openvino, bf16 or openvino-int8",
    "audit_file": "DICOM audit messages (PS3.15 A.5), one a line, appended to this file",
    "audit_syslog": "Audit Record Repository, HOST:PORT: syslog over TLS (RFC 5425), spooled",
    "audit_ca": "CA (PEM) the audit repository's certificate must be signed by",
    "alert_webhook": "URL alerts are POSTed to as JSON (none: no webhook)",
    "alert_smtp": "mail server alerts are sent through, HOST:PORT (STARTTLS when offered)",
    "alert_to": "e-mail recipients of alerts",
    "alert_from": "sender address of alert e-mails",
    "alert_after_minutes": "an SR failing to send this long raises an alert",
    "alert_positive": "also alert on every positive result",
    "rule": "routing rules ([[rule]]): which series are classified, shadowed or ignored",
    "ignore_keep_hours": "how long the files of an ignored series are kept (0: removed at once)",
    "destination": "named destinations ([destination.NAME]: kind dicom, stow or hl7), each "
    "with its own delivery job per series",
    "hl7": "RIS that results go to as HL7 v2.5.1 ORU^R01 over MLLP, HOST:PORT (none: off)",
    "hl7_tls": "MLLP over TLS to the RIS: verified against tls_ca (else the system's CAs), "
    "tls_cert/tls_key as the client certificate",
    "hl7_sending_application": "MSH-3 of the ORU",
    "hl7_sending_facility": "MSH-4 of the ORU",
    "hl7_receiving_application": "MSH-5 of the ORU",
    "hl7_receiving_facility": "MSH-6 of the ORU",
    "hl7_priority": "result -> HL7 table 0027 worklist priority, LABEL=CODE (default covid=S)",
    "hl7_priority_fields": "fields the priority goes to: ORC-7, OBR-27 (TQ.6), TQ1-9",
    "result_card": "send a result card (Secondary Capture) with each SR, to the same destination",
}


@dataclass(frozen=True)
class Table:
    """A table: column headings and rows of plain text."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Bullets:
    """A bullet list of plain text items."""

    items: tuple[str, ...]


Block = str | Table | Bullets


@dataclass(frozen=True)
class Section:
    """A titled section: paragraphs, bullet lists and tables, then its subsections."""

    title: str
    blocks: tuple[Block, ...] = ()
    children: tuple[Section, ...] = ()


@dataclass(frozen=True)
class Statement:
    """The conformance statement: sections for people, ``data`` for programs."""

    title: str
    sections: tuple[Section, ...]
    data: dict[str, Any] = field(default_factory=dict)


# --- building ---------------------------------------------------------------------------------


def statement_config(path: Path | None) -> NodeConfig:
    """The node settings the statement describes: defaults, with ``path`` (TOML) applied."""
    return load_settings(path)


def _name(uid: str) -> str:
    return str(UID(uid).name)


def _uid_rows(uids: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    return tuple((_name(uid), str(uid)) for uid in uids)


def _hex(code: int) -> str:
    return f"0x{code:04X}"


def _code(concept: Any) -> str:
    return f"({concept.value}, {concept.scheme_designator}, {concept.meaning})"


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:g} s"


def _sop(uid: str, role: str, service: str, ae: str) -> dict[str, str]:
    return {"uid": str(uid), "name": _name(uid), "role": role, "service": service, "ae": ae}


def _sop_classes(listener: Any) -> list[dict[str, str]]:
    out = []
    for context in listener.supported_contexts:
        uid = str(context.abstract_syntax)
        service = "Verification" if uid == VERIFICATION else "Storage"
        out.append(_sop(uid, "SCP", service, LISTENER))
    out.append(_sop(Comprehensive3DSRStorage, "SCU", "Storage", SR_SENDER))
    # The result card, sent with each SR when result_card is set.
    out.append(_sop(SecondaryCaptureImageStorage, "SCU", "Storage", SR_SENDER))
    out.append(_sop(VERIFICATION, "SCU", "Verification", PACS_CLIENT))
    for uid in QUERY_RETRIEVE_CLASSES:
        out.append(_sop(uid, "SCU", "Query/Retrieve", PACS_CLIENT))
    for uid in STORAGE_CLASSES:
        out.append(_sop(uid, "SCP", "Storage (C-GET sub-operations)", PACS_CLIENT))
    for uid in STORAGE_CLASSES:
        out.append(_sop(uid, "SCP", "Storage (C-MOVE destination)", MOVE_RECEIVER))
    return out


def _transfer_syntaxes(listener: Any) -> dict[str, list[str]]:
    """Per SOP class: the listener's accepted syntaxes in order, else those proposed."""
    out: dict[str, list[str]] = {}
    for context in listener.supported_contexts:
        out[str(context.abstract_syntax)] = [str(uid) for uid in context.transfer_syntax]
    out[str(Comprehensive3DSRStorage)] = list(SR_TRANSFER_SYNTAXES)
    out[str(SecondaryCaptureImageStorage)] = list(SR_TRANSFER_SYNTAXES)
    for uid in QUERY_RETRIEVE_CLASSES:
        out[str(uid)] = list(QUERY_TRANSFER_SYNTAXES)
    return out


def _status_codes() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for code, (meaning, cause) in STORE_STATUSES.items():
        out.append(
            {
                "code": _hex(code),
                "value": code,
                "meaning": meaning,
                "cause": cause,
                "service": "C-STORE",
                "ae": LISTENER,
            }
        )
    out.append(
        {
            "code": _hex(STATUS_SUCCESS),
            "value": STATUS_SUCCESS,
            "meaning": "Success",
            "cause": "the node is up",
            "service": "C-ECHO",
            "ae": LISTENER,
        }
    )
    for code, meaning, cause in _retrieval_statuses():
        for ae in (PACS_CLIENT, MOVE_RECEIVER):
            out.append(
                {
                    "code": _hex(code),
                    "value": code,
                    "meaning": meaning,
                    "cause": cause,
                    "service": "C-STORE (retrieval sub-operation)",
                    "ae": ae,
                }
            )
    return out


def _retrieval_statuses() -> tuple[tuple[int, str, str], ...]:
    return (
        (STATUS_SUCCESS, "Success", "instance stored in the batch cache"),
        (
            STATUS_OUT_OF_RESOURCES,
            "Refused: Out of Resources",
            "cache full, instance larger than max_instance_mb, a write failed, or the "
            "retrieval was already cancelled after an earlier refusal",
        ),
        (
            STATUS_CANNOT_UNDERSTAND,
            "Error: Cannot understand",
            "the instance could not be parsed or its UIDs are invalid",
        ),
        (
            STATUS_NOT_EXPECTED,
            "Error: Cannot understand (not announced)",
            "an instance the image-level C-FIND of the series did not announce, or an "
            "invalid Affected SOP Instance UID",
        ),
    )


def character_sets() -> list[str]:
    """The Specific Character Set values read in received data sets and kept in the SR."""
    return sorted(term for term in python_encoding if term)


def _attr(
    keyword: str, module: str, origin: str, condition: str = "always", value: str = ""
) -> dict[str, str]:
    return {
        "keyword": keyword,
        "module": module,
        "origin": origin,
        "condition": condition,
        "value": value,
    }


COPIED = "copied from source"
GENERATED = "generated"
CONSTANT = "constant"
IF_IN_SOURCE = "if in source"


def sr_attributes() -> list[dict[str, str]]:
    """The top-level attributes of the SR, by module, and where each value comes from."""
    rows = [
        _attr("SOPClassUID", "SOP Common", CONSTANT, value=str(Comprehensive3DSRStorage)),
        _attr(
            "SOPInstanceUID",
            "SOP Common",
            GENERATED,
            value="2.25 UID derived from the stated result, revision and predecessor",
        ),
        _attr("SpecificCharacterSet", "SOP Common", COPIED, IF_IN_SOURCE),
        _attr("InstanceCreationDate", "SOP Common", GENERATED),
        _attr("InstanceCreationTime", "SOP Common", GENERATED),
        _attr("TimezoneOffsetFromUTC", "SOP Common", COPIED, IF_IN_SOURCE),
        _attr(
            "ContributingEquipmentSequence",
            "SOP Common",
            GENERATED,
            value=f"the algorithm: purpose {_code(codes.PROCESSING_ALGORITHM)}, model name, "
            "version and Device UID",
        ),
    ]
    for module, keywords in COPIED_MODULES.items():
        for keyword in keywords:
            rows.append(_attr(keyword, module, COPIED, IF_IN_SOURCE))
    rows += [
        _attr("Modality", "SR Document Series", CONSTANT, value="SR"),
        _attr(
            "SeriesInstanceUID",
            "SR Document Series",
            GENERATED,
            value="2.25 UID derived from study, series and model name (one per series)",
        ),
        _attr(
            "SeriesNumber",
            "SR Document Series",
            GENERATED,
            value=f"{SR_SERIES_NUMBER} + the source's SeriesNumber (0-{SERIES_NUMBER_SPAN - 1})",
        ),
        _attr(
            "SeriesDescription",
            "SR Document Series",
            GENERATED,
            value=f"'{SR_SERIES_DESCRIPTION} of series N ...'",
        ),
        _attr(
            "ReferencedPerformedProcedureStepSequence",
            "SR Document Series",
            CONSTANT,
            value="empty",
        ),
        _attr("Manufacturer", "General Equipment", CONSTANT, value=MANUFACTURER),
        _attr(
            "ManufacturerModelName", "General Equipment", CONSTANT, value=MANUFACTURER_MODEL_NAME
        ),
        _attr("SoftwareVersions", "General Equipment", GENERATED, value=f"ctcovid {__version__}"),
        _attr("InstanceNumber", "SR Document General", GENERATED, value="the revision: 1, 2, ..."),
        _attr("ContentDate", "SR Document General", GENERATED),
        _attr("ContentTime", "SR Document General", GENERATED),
        _attr("CompletionFlag", "SR Document General", CONSTANT, value="COMPLETE"),
        _attr("VerificationFlag", "SR Document General", CONSTANT, value="UNVERIFIED"),
        _attr("PreliminaryFlag", "SR Document General", CONSTANT, value="PRELIMINARY"),
        _attr("PerformedProcedureCodeSequence", "SR Document General", CONSTANT, value="empty"),
        _attr(
            "CurrentRequestedProcedureEvidenceSequence",
            "SR Document General",
            GENERATED,
            value="every analysed instance of the source series",
        ),
        _attr(
            "ReferencedRequestSequence",
            "SR Document General",
            COPIED,
            "if the source has RequestAttributesSequence",
        ),
        _attr(
            "PredecessorDocumentsSequence",
            "SR Document General",
            GENERATED,
            "revision 2 and later",
            value="the SR this revision replaces",
        ),
        _attr("ValueType", "SR Document Content", CONSTANT, value="CONTAINER"),
        _attr(
            "ConceptNameCodeSequence",
            "SR Document Content",
            CONSTANT,
            value=_code(dicom_codes.DCM.ImagingMeasurementReport),
        ),
        _attr("ContinuityOfContent", "SR Document Content", CONSTANT, value="CONTINUOUS"),
        _attr("ContentTemplateSequence", "SR Document Content", CONSTANT, value="TID 1500 (DCMR)"),
        _attr("ContentSequence", "SR Document Content", GENERATED, value="the content tree"),
    ]
    return rows


def _row(
    depth: int, relationship: str, value_type: str, name: Any, value: str, origin: str
) -> dict[str, Any]:
    return {
        "depth": depth,
        "relationship": relationship,
        "value_type": value_type,
        "concept_name": {
            "value": name.value,
            "scheme": name.scheme_designator,
            "meaning": name.meaning,
        },
        "value": value,
        "origin": origin,
    }


def sr_content_tree() -> list[dict[str, Any]]:
    """TID 1500 as the SR holds it: each content item, its concept name and where its value
    comes from (depth 0 is the document's root CONTAINER)."""
    dcm = dicom_codes.DCM
    return [
        _row(0, "", "CONTAINER", dcm.ImagingMeasurementReport, "TID 1500", CONSTANT),
        _row(
            1,
            "HAS CONCEPT MOD",
            "CODE",
            dcm.LanguageOfContentItemAndDescendants,
            "(en-US, RFC5646, English (United States))",
            CONSTANT,
        ),
        _row(
            1, "HAS OBS CONTEXT", "CODE", dcm.ObserverType, _code(codes.OBSERVER_DEVICE), CONSTANT
        ),
        _row(
            1, "HAS OBS CONTEXT", "UIDREF", dcm.DeviceObserverUID, "model's Device UID", GENERATED
        ),
        _row(1, "HAS OBS CONTEXT", "TEXT", dcm.DeviceObserverName, "model name", GENERATED),
        _row(1, "HAS OBS CONTEXT", "TEXT", dcm.DeviceObserverManufacturer, MANUFACTURER, CONSTANT),
        _row(1, "HAS OBS CONTEXT", "TEXT", dcm.DeviceObserverModelName, "model name", GENERATED),
        _row(1, "HAS CONCEPT MOD", "CODE", dcm.ProcedureReported, _code(codes.CT_CHEST), CONSTANT),
        _row(1, "CONTAINS", "CONTAINER", dcm.ImagingMeasurements, "", CONSTANT),
        _row(2, "CONTAINS", "CONTAINER", codes.MEASUREMENT_GROUP, "TID 1501", CONSTANT),
        _row(3, "HAS OBS CONTEXT", "TEXT", dcm.TrackingIdentifier, TRACKING_IDENTIFIER, CONSTANT),
        _row(
            3,
            "HAS OBS CONTEXT",
            "UIDREF",
            dcm.TrackingUniqueIdentifier,
            "2.25 UID from study, series and model name (the same across revisions)",
            GENERATED,
        ),
        _row(3, "CONTAINS", "CODE", codes.FINDING, _code(codes.COVID_19), CONSTANT),
        _row(3, "HAS CONCEPT MOD", "CODE", codes.FINDING_SITE, _code(codes.LUNG), CONSTANT),
        _row(3, "HAS CONCEPT MOD", "TEXT", dcm.AlgorithmName, "model name", GENERATED),
        _row(3, "HAS CONCEPT MOD", "TEXT", dcm.AlgorithmVersion, "model version", GENERATED),
        _row(3, "HAS CONCEPT MOD", "TEXT", dcm.AlgorithmManufacturer, MANUFACTURER, CONSTANT),
        _row(
            3,
            "HAS CONCEPT MOD",
            "TEXT",
            dcm.AlgorithmParameters,
            "one item each: window_center_hu, window_width_hu, threshold, slice_policy, "
            "runtime, n_slices_used, n_slices_total, stack",
            GENERATED,
        ),
        _row(
            3,
            "HAS CONCEPT MOD",
            "CODE",
            dcm.AlgorithmFamily,
            _code(codes.ARTIFICIAL_INTELLIGENCE),
            CONSTANT,
        ),
        _row(
            3,
            "CONTAINS",
            "NUM",
            codes.PROBABILITY,
            f"P(COVID-19) in [0, 1], unit {_code(codes.UNIT_NO_UNITS)}",
            GENERATED,
        ),
        _row(
            3,
            "CONTAINS",
            "CODE",
            codes.COVID_19,
            f"{_code(codes.PRESENT)}, {_code(codes.ABSENT)} or {_code(codes.INDETERMINATE)}",
            GENERATED,
        ),
        _row(
            3,
            "CONTAINS",
            "IMAGE",
            dcm.SourceOfMeasurement,
            "one per instance holding a key slice (frame numbers for multi-frame)",
            GENERATED,
        ),
    ]


def _sc_attributes() -> tuple[tuple[str, ...], ...]:
    return (
        ("SOPClassUID", CONSTANT, f"{SecondaryCaptureImageStorage} (Secondary Capture Image)"),
        ("Patient, study modules", COPIED, "as for the SR (when the source has them)"),
        ("SpecificCharacterSet, TimezoneOffsetFromUTC", COPIED, "as for the SR"),
        ("SeriesInstanceUID", GENERATED, "2.25 UID from study, series and model name"),
        (
            "SeriesNumber",
            GENERATED,
            f"{HEATMAP_SERIES_NUMBER} + the source's SeriesNumber (0-{SERIES_NUMBER_SPAN - 1})",
        ),
        ("SeriesDescription", GENERATED, f"'{HEATMAP_SERIES_DESCRIPTION} of series N ...'"),
        ("SOPInstanceUID", GENERATED, "2.25 UID from the result, revision, slice and pixels"),
        ("Manufacturer / ManufacturerModelName", CONSTANT, MANUFACTURER),
        ("ContributingEquipmentSequence", GENERATED, "the algorithm, as for the SR"),
        ("SourceImageSequence", GENERATED, "the source slice (and frame)"),
        ("DerivationDescription", GENERATED, "model, version and slice probability"),
        ("PhotometricInterpretation", CONSTANT, "RGB, 8 bits, Explicit VR Little Endian"),
        ("BurnedInAnnotation", CONSTANT, "NO"),
        ("BodyPartExamined", CONSTANT, "CHEST"),
    )


def _card_attributes() -> tuple[tuple[str, ...], ...]:
    return (
        ("SOPClassUID", CONSTANT, f"{SecondaryCaptureImageStorage} (Secondary Capture Image)"),
        ("Patient, study modules", COPIED, "as for the SR (when the source has them)"),
        ("SpecificCharacterSet, TimezoneOffsetFromUTC", COPIED, "as for the SR"),
        ("SeriesInstanceUID", GENERATED, "2.25 UID from study, series and model name"),
        (
            "SeriesNumber",
            GENERATED,
            f"{CARD_SERIES_NUMBER} + the source's SeriesNumber (0-{SERIES_NUMBER_SPAN - 1})",
        ),
        ("SeriesDescription", GENERATED, f"'{CARD_SERIES_DESCRIPTION} of series N ...'"),
        ("SOPInstanceUID", GENERATED, "2.25 UID from the SOP Instance UID of its SR"),
        ("InstanceNumber", GENERATED, "the revision of its SR"),
        ("Manufacturer / ManufacturerModelName", CONSTANT, MANUFACTURER),
        ("ContributingEquipmentSequence", GENERATED, "the algorithm, as for the SR"),
        ("SourceImageSequence", GENERATED, "the key slice (and frame)"),
        ("ContentDate, ContentTime", GENERATED, "when the card was made; the date drawn on it"),
        ("ImageComments", CONSTANT, PRELIMINARY),
        ("PhotometricInterpretation", CONSTANT, "RGB, 8 bits, Explicit VR Little Endian"),
        ("BurnedInAnnotation", CONSTANT, "YES"),
        ("BodyPartExamined", CONSTANT, "CHEST"),
    )


def _policies_table(config: NodeConfig, ae: Any) -> Table:
    allowed = ", ".join(ae.require_calling_aet) if ae.require_calling_aet else "any"
    return Table(
        ("policy", "value"),
        (
            ("AE title (called)", ae.ae_title),
            (
                "called AE title checked",
                "yes" if ae.require_called_aet else "no: any called AE title is accepted",
            ),
            ("calling AE titles accepted (allow_aet)", allowed),
            ("maximum PDU length offered and accepted", f"{ae.maximum_pdu_size} bytes"),
            ("associations at once (max_associations)", str(ae.maximum_associations)),
            (
                "associations per peer address (max_associations_per_address)",
                str(config.max_associations_per_address),
            ),
            (
                "connections at once (associations and TLS handshakes)",
                str(connection_limit(config)),
            ),
            ("ACSE timeout (association negotiation)", _seconds(ae.acse_timeout)),
            ("DIMSE timeout", _seconds(ae.dimse_timeout)),
            ("network timeout (each PDU must arrive whole within)", _seconds(ae.network_timeout)),
            ("association wall-clock cap", _seconds(config.max_association_seconds)),
            ("one C-STORE message wall-clock cap", _seconds(config.max_store_seconds)),
            ("largest data set (max_instance_mb)", f"{config.max_instance_mb:g} MiB"),
            ("largest command set", f"{guard.MAX_COMMAND_BYTES} bytes"),
            ("largest control PDU (A-ASSOCIATE-RQ ...)", f"{guard.MAX_CONTROL_PDU_BYTES} bytes"),
            (
                "largest data set held in memory (non C-STORE)",
                f"{guard.MAX_MEMORY_DATASET_BYTES} bytes",
            ),
            ("header elements parsed at most", str(MAX_HEADER_READS)),
            ("asynchronous operations window", "not negotiated: one operation at a time"),
            ("SOP class extended negotiation", "none"),
            ("implementation class UID", str(ae.implementation_class_uid)),
            ("implementation version name", str(ae.implementation_version_name)),
        ),
    )


def _rj(result: int, source: int, diagnostic: int) -> str:
    return f"{result} / {source} / {diagnostic}"


def _listener_section(config: NodeConfig, ae: Any) -> Section:
    contexts = Table(
        ("SOP class", "SOP class UID", "role", "transfer syntaxes, in order of preference"),
        tuple(
            (
                _name(str(cx.abstract_syntax)),
                str(cx.abstract_syntax),
                "SCP",
                ", ".join(f"{_name(ts)} ({ts})" for ts in cx.transfer_syntax),
            )
            for cx in ae.supported_contexts
        ),
    )
    statuses = Table(
        ("service", "status", "meaning", "cause"),
        (
            *(
                ("C-STORE", _hex(code), meaning, cause)
                for code, (meaning, cause) in STORE_STATUSES.items()
            ),
            ("C-ECHO", _hex(STATUS_SUCCESS), "Success", "the node is up"),
        ),
    )
    rejects = Table(
        ("result / source / diagnostic", "logged reason", "when"),
        (
            (_rj(1, 1, 3), REJECT_REASONS[(1, 3)], "calling AE title outside allow_aet"),
            (
                _rj(*guard.REJECT_LOCAL_LIMIT),
                "too_many_associations_from_address",
                "the peer's address holds max_associations_per_address already",
            ),
            (
                _rj(2, 3, 2),
                REJECT_REASONS[(3, 2)],
                "max_associations associations are running already",
            ),
        ),
    )
    return Section(
        f"Storage SCP and Verification SCP ({LISTENER}, `ctcovid listen`)",
        (
            "Receives CT and Enhanced CT images from modalities, routers and PACS, writes each "
            "durably and answers C-ECHO; complete series go to the worker for classification. "
            "This AE only accepts associations (the SR sender opens its own).",
        ),
        (
            Section(
                "SOP classes and transfer syntaxes",
                (
                    contexts,
                    "Rule: the listener accepts, from each proposed presentation context, the "
                    "first transfer syntax in its own order above that the context proposes "
                    "(the requestor's order does not matter). Explicit VR first keeps the VRs of "
                    "private elements. The list is exactly the syntaxes the ingest decodes with "
                    "the decoders installed here; "
                    + ", ".join(f"{_name(uid)} ({uid})" for uid in DEFLATED_TRANSFER_SYNTAXES)
                    + " are never accepted (inflating is unbounded work).",
                    Table(
                        ("result", "meaning", "when"),
                        CONTEXT_REJECTIONS,
                    ),
                ),
            ),
            Section("Association policies", (_policies_table(config, ae),)),
            Section(
                "Association rejection",
                (
                    rejects,
                    "Every rejection and cut connection is logged with the peer's address, "
                    "calling AE title and reason, and counted. A PDU longer than the maximum "
                    "offered, a stalled peer, or a cap passed ends the connection (A-ABORT first "
                    "for the caps).",
                ),
            ),
            Section("Status codes returned", (statuses,)),
        ),
    )


def _sr_sender_section(config: NodeConfig) -> Section:
    return Section(
        f"Storage SCU for the SR ({SR_SENDER})",
        (
            "Sends each SR to the configured destination: C-STORE to `peer` as calling AE "
            f"title {config.ae_title} (the node; batch uses its --ae-title), or STOW-RS to "
            "`stow` (see the DICOMweb user agent). One association per SR, released after it; with "
            "`result_card` the SR's result card goes in the same association (or STOW-RS "
            "request), and the send counts as delivered only when both are stored.",
            Table(
                ("SOP class", "SOP class UID", "role", "transfer syntaxes proposed"),
                (
                    (
                        _name(Comprehensive3DSRStorage),
                        str(Comprehensive3DSRStorage),
                        "SCU",
                        "the SR file's own syntax first, then "
                        + ", ".join(f"{_name(ts)} ({ts})" for ts in SR_TRANSFER_SYNTAXES),
                    ),
                    (
                        _name(SecondaryCaptureImageStorage),
                        str(SecondaryCaptureImageStorage),
                        "SCU",
                        "the result card, in the SR's association, with result_card only; "
                        "the card file's own syntax first, then "
                        + ", ".join(f"{_name(ts)} ({ts})" for ts in SR_TRANSFER_SYNTAXES),
                    ),
                ),
            ),
            Table(
                ("policy", "value"),
                (
                    ("destination", config.sr_destination),
                    ("calling AE title", config.ae_title),
                    ("maximum PDU length", f"{config.max_pdu_bytes} bytes"),
                    ("TLS", "yes" if config.send_tls else "no"),
                    ("network, ACSE and DIMSE timeouts", _seconds(config.network_timeout_seconds)),
                    ("deadline of one send", _seconds(config.send_deadline)),
                ),
            ),
            "Statuses counted as delivered: "
            + ", ".join(_hex(code) for code in sorted(DELIVERED_STATUSES))
            + " (a warning is logged for those other than 0x0000); any other status, a "
            "rejection, an abort or the deadline is a failed attempt, retried with backoff.",
        ),
    )


def _pacs_client_section() -> Section:
    syntaxes = ", ".join(f"{_name(ts)} ({ts})" for ts in QUERY_TRANSFER_SYNTAXES)
    rows: list[tuple[str, ...]] = [
        (_name(VERIFICATION), VERIFICATION, "SCU", syntaxes),
        *((_name(uid), str(uid), "SCU", syntaxes) for uid in QUERY_RETRIEVE_CLASSES),
    ]
    for uid in STORAGE_CLASSES:
        rows.append(
            (
                _name(uid),
                str(uid),
                "SCP (C-GET, role selection)",
                "two contexts: lossless "
                + ", ".join(LOSSLESS_TRANSFER_SYNTAXES)
                + "; lossy "
                + ", ".join(LOSSY_DECODABLE_SYNTAXES),
            )
        )
    return Section(
        f"Query/Retrieve SCU ({PACS_CLIENT}, `ctcovid batch --from-pacs`)",
        (
            "Batch reprocessing lists studies and series by C-FIND (Study Root), lists a "
            "series' instances by an image-level C-FIND, and retrieves the series by C-GET "
            "(or by C-MOVE to the C-MOVE destination below). It only reads: no C-STORE to, "
            "and no deletion from, the PACS except the SR sent back.",
            Table(
                ("SOP class", "SOP class UID", "role", "transfer syntaxes proposed"), tuple(rows)
            ),
            Bullets(
                (
                    "study-level return keys: " + ", ".join(STUDY_RETURN_KEYS),
                    "series-level return keys: " + ", ".join(SERIES_RETURN_KEYS),
                    f"at most {MAX_FIND_MATCHES} matches per C-FIND",
                    f"one association (a C-FIND, or one series' retrieval) lasts at most "
                    f"{DEFAULT_DEADLINE_SECONDS:g} s by default",
                    "a retrieval that did not deliver every announced instance fails the "
                    "series; it is never classified as if whole",
                )
            ),
            Table(
                ("status returned to C-STORE sub-operations", "meaning", "cause"),
                tuple(
                    (_hex(code), meaning, cause) for code, meaning, cause in _retrieval_statuses()
                ),
            ),
        ),
    )


def _move_receiver_section() -> Section:
    return Section(
        f"C-MOVE destination ({MOVE_RECEIVER}, `ctcovid batch --move-port`)",
        (
            "A Storage SCP that runs only during a batch with --move-port: it accepts "
            "associations only from the PACS's AE title, requires its own AE title to be "
            "called, and stores only instances a retrieval in progress announced, with the "
            "listener's transport limits.",
            Table(
                ("SOP class", "SOP class UID", "role", "transfer syntaxes, in order of preference"),
                tuple(
                    (_name(uid), str(uid), "SCP", ", ".join(TRANSFER_SYNTAXES))
                    for uid in STORAGE_CLASSES
                ),
            ),
        ),
    )


def _dicomweb_section() -> Section:
    return Section(
        f"DICOMweb user agent ({DICOMWEB})",
        (
            Table(
                ("service", "used for", "details"),
                (
                    (
                        "QIDO-RS",
                        "batch --from-dicomweb: studies, series and instances; the SR series a "
                        "destination holds",
                        "the same return keys as C-FIND",
                    ),
                    (
                        "WADO-RS",
                        "batch --from-dicomweb: one series at a time",
                        "Accept: " + accept_header() + "; Accept-Encoding: identity",
                    ),
                    (
                        "STOW-RS",
                        "the node (stow) and batch (--stow): the SR",
                        "HTTP " + ", ".join(str(s) for s in sorted(RETRYABLE_HTTP)) + ", 5xx "
                        "and connection errors are retried; 409 is checked against the archive "
                        "by QIDO-RS; other 4xx fail the job at once",
                    ),
                ),
            ),
            f"Credentials come from ${AUTH_ENV} (batch reading) and ${STOW_AUTH_ENV} or a file "
            "(STOW-RS), as 'Bearer TOKEN' or 'Basic USER:PASSWORD', never from the command line "
            "or the URL. TLS certificates are always verified.",
        ),
    )


def _sr_iod_section() -> Section:
    attributes = sr_attributes()
    by_module: dict[str, list[dict[str, str]]] = {}
    for row in attributes:
        by_module.setdefault(row["module"], []).append(row)
    copied_modules = set(COPIED_MODULES)
    rows: list[tuple[str, ...]] = []
    for module, items in by_module.items():
        if module in copied_modules:
            rows.append(
                (
                    module,
                    ", ".join(item["keyword"] for item in items),
                    COPIED,
                    "each attribute the source has, as it is",
                )
            )
            continue
        for item in items:
            note = item["value"]
            if item["condition"] != "always":
                note = f"{note} ({item['condition']})".strip()
            rows.append((module, item["keyword"], item["origin"], note))
    tree = Table(
        ("level", "relationship", "value type", "concept name", "value", "origin"),
        tuple(
            (
                ">" * row["depth"] or "root",
                row["relationship"],
                row["value_type"],
                "({value}, {scheme}, {meaning})".format(**row["concept_name"]),
                row["value"],
                row["origin"],
            )
            for row in sr_content_tree()
        ),
    )
    return Section(
        "Created SOP instances",
        (),
        (
            Section(
                f"Comprehensive 3D SR ({Comprehensive3DSRStorage}): TID 1500",
                (
                    "One SR per classified series (IHE AI Results), filed into the source study. "
                    "Attributes and where their values come from (copied from the source "
                    "series' first instance, generated, or constant):",
                    Table(("module", "attribute", "origin", "value"), tuple(rows)),
                    "Content tree (TID 1500 Imaging Measurement Report, one TID 1501 "
                    "measurement group):",
                    tree,
                ),
            ),
            Section(
                f"Secondary Capture Image ({SecondaryCaptureImageStorage}): result card",
                (
                    "With `result_card` (node) or `--result-card` (batch), and by `ctcovid "
                    "classify --card FILE`: one RGB image per SR that states in its pixels the "
                    "finding and probability the SR states, the threshold, the model, its "
                    "runtime, the date and '" + PRELIMINARY + "', with the key slice and its "
                    "heatmap; sent with the SR of the same revision, to the same destination. "
                    "Its own series, one card per SR revision.",
                    Table(("attribute", "origin", "value"), _card_attributes()),
                ),
            ),
            Section(
                f"Secondary Capture Image ({SecondaryCaptureImageStorage}): heatmaps",
                (
                    "Heatmaps (class-activation maps over key slices) are written as Secondary "
                    "Capture files by `ctcovid classify --heatmaps DIR --heatmaps-dicom`; the "
                    "node and batch do not create or send them.",
                    Table(
                        ("attribute", "origin", "value"),
                        _sc_attributes(),
                    ),
                ),
            ),
        ),
    )


def _config_section(config: NodeConfig, source: Path | None) -> Section:
    defaults = NodeConfig(store=Path(UNCONFIGURED_STORE))
    rows = []
    for f in dataclasses.fields(NodeConfig):
        if f.name == "extra":
            continue
        default = getattr(defaults, f.name)
        value = getattr(config, f.name)
        if f.name == "rule":  # the rules by name and action; their conditions are site data
            default, value = (
                ", ".join(f"{r.name} ({r.action})" for r in c.rules) for c in (defaults, config)
            )
        elif f.name == "destination":
            default, value = (
                ", ".join(f"{d.name} ({d.kind}: {d.address})" for d in c.destinations)
                for c in (defaults, config)
            )
        rows.append(
            (
                f.name,
                _setting_text(default),
                _setting_text(value),
                _SETTINGS.get(f.name, ""),
            )
        )
    where = f"the file {source}" if source is not None else "no file (defaults)"
    return Section(
        "Configuration",
        (
            f"Node settings (TOML keys, flags of `ctcovid listen`), as configured by {where}:",
            Table(("setting", "default", "configured", "meaning"), tuple(rows)),
        ),
    )


def _setting_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def conformance_statement(config: NodeConfig, source: Path | None = None) -> Statement:
    """The conformance statement of a node configured by ``config`` (from ``source``)."""
    ae = build_ae(config)
    sop_classes = _sop_classes(ae)
    overview = Table(
        ("network service", "SOP classes", "user of service (SCU)", "provider of service (SCP)"),
        (
            ("Storage", "CT Image, Enhanced CT Image", "no", f"yes ({LISTENER})"),
            ("Verification", "Verification", f"yes ({PACS_CLIENT})", f"yes ({LISTENER})"),
            ("Storage", "Comprehensive 3D SR", f"yes ({SR_SENDER})", "no"),
            (
                "Storage",
                "Secondary Capture Image (result card)",
                f"yes ({SR_SENDER}, with result_card)",
                "no",
            ),
            (
                "Query/Retrieve",
                "Study Root FIND, GET, MOVE",
                f"yes ({PACS_CLIENT})",
                "no (the C-GET/C-MOVE sub-operations are received as Storage SCP)",
            ),
            ("DICOMweb", "QIDO-RS, WADO-RS, STOW-RS", f"yes ({DICOMWEB})", "no"),
        ),
    )
    intro = Section(
        "Overview",
        (
            f"ctcovid {__version__} is a COVID-19 classifier for chest CT. As a DICOM node it "
            "receives CT series, classifies every complete series and sends the result back as "
            "a Comprehensive 3D SR (TID 1500) by C-STORE or STOW-RS; in batch it queries and "
            "retrieves from a PACS by DIMSE or DICOMweb. This statement is generated by "
            "`ctcovid conformance` from the constants the code uses, for the configuration "
            "shown below.",
            overview,
            "Secondary Capture heatmaps are created as files (`ctcovid classify`), not sent; "
            "the Secondary Capture result card is sent with each SR when `result_card` is set "
            f"(here: {'yes' if config.result_card else 'no'}).",
        ),
    )
    model = Section(
        "Implementation model",
        (
            Table(
                ("application entity", "AE title", "what it does"),
                (
                    (LISTENER, config.ae_title, "accepts CT and C-ECHO; writes instances durably"),
                    (
                        SR_SENDER,
                        config.ae_title,
                        "sends the SR of each classified series to the destination",
                    ),
                    (PACS_CLIENT, "--ae-title of batch", "C-ECHO, C-FIND, C-GET/C-MOVE"),
                    (MOVE_RECEIVER, "--ae-title of batch", "receives C-MOVE sub-operations"),
                    (DICOMWEB, "(HTTP)", "QIDO-RS, WADO-RS, STOW-RS"),
                ),
            ),
            "Data flow: a modality or PACS sends a CT series to the listener; each instance is "
            "fsynced and recorded before success is answered. A series is complete when no "
            f"instance arrived for stable_seconds ({config.stable_seconds:g} s); the worker "
            "takes the first routing rule that matches its header (rules: "
            + ", ".join(f"{r.name} = {r.action}" for r in config.rules)
            + "; shadow keeps the SR and sends nothing, ignore does not classify), "
            "decodes and classifies it and builds the SR, which the SR sender delivers. In "
            "batch, the PACS client finds and retrieves series, and the SR goes out the same "
            "way.",
            "Sequencing: the listener answers every C-STORE after the instance is on disk; "
            "classification and sending never hold an association open. Late instances reopen "
            "the series and lead to a revised SR.",
        ),
    )
    failure = Section(
        "Behaviour on failure",
        (
            Bullets(
                (
                    "Delivery guarantee: an instance is acknowledged (0x0000) only once its file "
                    "is fsynced and renamed and it is recorded in the job database (SQLite, WAL, "
                    "synchronous=FULL); nothing acknowledged is lost across a crash or power "
                    "cut, and every unfinished job resumes at the next start.",
                    f"Sending retries with exponential backoff from retry_seconds "
                    f"({config.retry_seconds:g} s) up to max_retry_seconds "
                    f"({config.max_retry_seconds:g} s), at most max_attempts "
                    f"({config.max_attempts}) attempts, each within "
                    f"{_seconds(config.send_deadline)}; "
                    "then the job is failed and listed by `ctcovid queue`.",
                    "One current SR per series: revisions of a series' SR share one SR series "
                    "and Tracking UID, are numbered by InstanceNumber (1, 2, ...) and each names "
                    "the SR it replaces in PredecessorDocumentsSequence; a result the "
                    "destination already holds (same label and stated probability) is not sent "
                    "again.",
                    f"On SIGTERM the listener stops accepting, gives open associations "
                    f"{LISTENER_DRAIN_SECONDS:g} s and then cuts them (their senders resend).",
                    "A disk below min_free_mb refuses instances with 0xA700; the job waits for "
                    "space instead of failing.",
                )
            ),
        ),
    )
    network = Section(
        "Communication profiles",
        (
            Bullets(
                (
                    "TCP/IP (DICOM Upper Layer, PS3.8); the listener binds "
                    f"{config.host}:{config.port}.",
                    f"TLS (PS3.15 B.1): {'on' if config.tls else 'off'} for the listener. "
                    f"Minimum version {_tls_version()}; peers verified; with tls_ca every "
                    "caller must show a certificate that "
                    "CA signed.",
                    "AE allow-list: "
                    + (", ".join(config.allow_aet) if config.allow_aet else "none (any caller)")
                    + ". A calling AE title is not authentication: use TLS with client "
                    "certificates and a firewall.",
                )
            ),
        ),
    )
    charsets = character_sets()
    support = Section(
        "Character sets",
        (
            "Received data sets may use any of these Specific Character Set values; the SR and "
            "heatmaps copy the source's value verbatim, so copied names read back as they "
            "were. C-FIND identifiers with non-ASCII values are sent as "
            f"{UTF8_CHARACTER_SET} (UTF-8).",
            Bullets(tuple(charsets)),
        ),
    )
    security = Section(
        "Security",
        (
            Bullets(
                (
                    "TLS with client certificates (tls_cert, tls_key, tls_ca) authenticates "
                    "and encrypts; without tls_ca the node encrypts but does not check callers.",
                    "Access control: allow_aet rejects other calling AE titles at association; "
                    "bounds on PDUs, time, memory, disk and connections protect against hostile "
                    "peers.",
                    "HTTP server (http_port): loopback by default; any other address needs TLS "
                    "and credentials (HTTP Basic for people, bearer tokens for scripts), every "
                    "POST a CSRF or API token; no patient data unless http_show_phi.",
                    "Alerts (alert_webhook, alert_smtp) are outgoing connections of their own; "
                    "they name study and series UIDs and counts, never patient data or the "
                    "free-text reasons that may quote received values.",
                    "RIS (hl7): an outgoing MLLP connection per ORU^R01, plain TCP, or TLS 1.2 "
                    "or later with hl7_tls (the RIS's certificate verified against tls_ca or the "
                    "system's CAs, tls_cert/tls_key shown when set); it carries patient name, ID, "
                    "birth date and sex, and the result. Connection, acknowledgement and whole "
                    "send are bounded by network_timeout_seconds and send_deadline_seconds.",
                    "Named destinations ([destination.NAME]): outgoing C-STORE (TLS when "
                    "tls = true) or STOW-RS (TLS always verified) connections of the SR sender, "
                    "or MLLP connections to a RIS (kind hl7, as for hl7), each with its own "
                    "delivery job, retries and deadline per series"
                    + (
                        ": "
                        + ", ".join(
                            f"{d.name} ({d.kind}, {d.address})" for d in config.destinations
                        )
                        if config.destinations
                        else " (none configured)"
                    )
                    + ".",
                    _audit_text(config),
                )
            ),
            Table(
                ("audit event", "EventID", "when"),
                tuple((code[2], f"({code[0]}, {code[1]})", when) for code, when in AUDIT_EVENTS),
            ),
        ),
    )
    sections = (
        intro,
        model,
        Section(
            "Application entity specifications",
            (),
            (
                _listener_section(config, ae),
                _sr_sender_section(config),
                _pacs_client_section(),
                _move_receiver_section(),
                _dicomweb_section(),
            ),
        ),
        failure,
        network,
        support,
        _sr_iod_section(),
        _config_section(config, source),
        security,
    )
    data = {
        "product": "ctcovid",
        "version": __version__,
        "ae_title": config.ae_title,
        "sop_classes": sop_classes,
        "transfer_syntaxes": _transfer_syntaxes(ae),
        "implementation_class_uid": str(ae.implementation_class_uid),
        "implementation_version_name": str(ae.implementation_version_name),
        "character_sets": charsets,
        "status_codes": _status_codes(),
        "maximum_pdu_bytes": ae.maximum_pdu_size,
        "max_associations": ae.maximum_associations,
        "sr_attributes": sr_attributes(),
        "sr_content_tree": sr_content_tree(),
        "configuration": {
            f.name: _json_value(getattr(config, f.name))
            for f in dataclasses.fields(NodeConfig)
            if f.name != "extra"
        },
        "audit_trail": {
            "events": [
                {"event_id": code[0], "coding_scheme": code[1], "meaning": code[2], "when": when}
                for code, when in AUDIT_EVENTS
            ],
            "file": _json_value(config.audit_file),
            "syslog": config.audit_syslog,
            "msgid": MSGID,
            "max_spool": DEFAULT_MAX_SPOOL,
        },
    }
    return Statement(f"DICOM Conformance Statement: ctcovid {__version__}", sections, data)


def _audit_text(config: NodeConfig) -> str:
    where = [f"the file {config.audit_file}"] if config.audit_file is not None else []
    if config.audit_syslog:
        where.append(f"the Audit Record Repository {config.audit_syslog}")
    return (
        "Audit trail (PS3.15 A.5, IHE ATNA): DICOM audit messages for the events below, to "
        "audit_file (one XML message a line, appended and fsynced) and/or audit_syslog with "
        f"audit_ca (syslog over TLS, RFC 5424 and 5425, APP-NAME {APP_NAME}, MSGID {MSGID}, "
        "facility authpriv). Messages for the repository wait in the store's "
        f"{AUDIT_SPOOL_DIR} folder while it is unreachable (at most {DEFAULT_MAX_SPOOL}; past "
        "that they are dropped, counted and then audited as lost) and are delivered in order "
        "once it is back; receiving never waits for them. Patients are named by ID, only in "
        "the messages; logs never name patients. Configured: "
        + (" and ".join(where) if where else "off")
        + "."
    )


def _tls_version() -> str:
    """``TLSv1_2`` as ``TLS 1.2``."""
    return MINIMUM_TLS_VERSION.name.replace("TLSv", "TLS ").replace("_", ".")


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return list(value)
    return str(value)


# --- rendering --------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_blocks(blocks: Sequence[Block]) -> list[str]:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            out.append("| " + " | ".join(map(_md_cell, block.columns)) + " |")
            out.append("|" + "---|" * len(block.columns))
            out.extend("| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows)
        elif isinstance(block, Bullets):
            out.extend(f"- {item}" for item in block.items)
        else:
            out.append(block)
        out.append("")
    return out


def _md_section(section: Section, level: int) -> list[str]:
    out = ["#" * level + " " + section.title, ""]
    out += _md_blocks(section.blocks)
    for child in section.children:
        out += _md_section(child, min(level + 1, 6))
    return out


def to_markdown(statement: Statement) -> str:
    lines = [f"# {statement.title}", ""]
    for section in statement.sections:
        lines += _md_section(section, 2)
    return "\n".join(lines).rstrip() + "\n"


def _html_blocks(blocks: Sequence[Block]) -> list[str]:
    esc = html.escape
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            out.append("<table>")
            out.append(
                "<thead><tr>"
                + "".join(f"<th>{esc(c)}</th>" for c in block.columns)
                + "</tr></thead>"
            )
            out.append("<tbody>")
            out.extend(
                "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
                for row in block.rows
            )
            out.append("</tbody></table>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
        else:
            out.append(f"<p>{esc(block)}</p>")
    return out


def _html_section(section: Section, level: int) -> list[str]:
    tag = f"h{min(level, 6)}"
    out = ["<section>", f"<{tag}>{html.escape(section.title)}</{tag}>"]
    out += _html_blocks(section.blocks)
    for child in section.children:
        out += _html_section(child, level + 1)
    out.append("</section>")
    return out


_STYLE = (
    "body{font-family:sans-serif;max-width:80em;margin:2em auto;padding:0 1em;line-height:1.4}"
    "table{border-collapse:collapse;margin:0.5em 0 1em}"
    "th,td{border:1px solid #999;padding:0.2em 0.5em;text-align:left;vertical-align:top}"
    "th{background:#eee}"
)


def to_html(statement: Statement) -> str:
    """A self-contained HTML page (no external resources); every text escaped."""
    title = html.escape(statement.title)
    body: list[str] = []
    for section in statement.sections:
        body += _html_section(section, 2)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{title}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def to_json(statement: Statement) -> str:
    return json.dumps(statement.data, indent=2, ensure_ascii=False) + "\n"


def render(statement: Statement, fmt: str) -> str:
    """``statement`` as ``markdown``, ``html`` or ``json``."""
    if fmt == "markdown":
        return to_markdown(statement)
    if fmt == "html":
        return to_html(statement)
    if fmt == "json":
        return to_json(statement)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}. Received: {fmt!r}.")


__all__ = [
    "FORMATS",
    "Bullets",
    "Section",
    "Statement",
    "Table",
    "character_sets",
    "conformance_statement",
    "render",
    "sr_attributes",
    "sr_content_tree",
    "statement_config",
    "to_html",
    "to_json",
    "to_markdown",
]
