"""The result as HL7 v2.5.1 for the RIS: an ORU^R01 built from the SR it reports, with hl7apy.

The ORU is built from the SR, not beside it: the SR already holds everything the message
states (the source's Patient and General Study modules copied in full, its requests, the
finding, the stated probability, the threshold and the model among the algorithm's
parameters), so the two can never disagree, and batch, which decides a revision only when it
sends, builds the same message from the same file. hl7apy builds the message segment by
segment and validates it strictly against the 2.5.1 ORU^R01 structure before it leaves.

Segments and fields:

=========  =====================================================================================
MSH        MSH-3/4 sending application and facility, MSH-5/6 receiving; MSH-7 the SR's content
           date and time; MSH-10 :func:`message_control_id`, derived from the SR's SOP Instance
           UID, so that a resend is the same message; MSH-11 ``P``; MSH-18 ``UNICODE UTF-8``
           when any value is not ASCII (the bytes on the wire are UTF-8 in any case)
PID        PID-3 PatientID with IssuerOfPatientID as assigning authority; PID-5 one repetition
           per component group of PatientName (XPN.8 ``A`` alphabetic, ``I`` ideographic, ``P``
           phonetic); PID-7 birth date; PID-8 sex
ORC, OBR   ORC-1 ``RE``; ORC-2/OBR-2 placer and ORC-3/OBR-3 filler order number from the
           source's request (RequestAttributesSequence, copied into the SR), the filler number
           falling back on the AccessionNumber; OBR-4 ``24627-2^CT Chest^LN``; OBR-7 study date
           and time; OBR-18 AccessionNumber and OBR-19 RequestedProcedureID (IHE Scheduled
           Workflow's places for them); OBR-22 the SR's content date and time; OBR-24 ``CT``;
           OBR-25 ``P`` (preliminary: an AI result no physician verified), ``C`` when it
           corrects a result the RIS already accepted; the worklist priority as
           :class:`OruSettings` maps it
OBX        1 the finding, CWE ``840539006^COVID-19^SCT`` = present / absent / indeterminate
           (OBX-8 ``A`` when present); 2 the probability, NM, unit ``1`` (UCUM); 3 the
           threshold, NM; 4 and 5 the model's name and version, ST (DCM 111001, 111003); 6 the
           Study Instance UID, ST (DCM 110180); 7 the SR's SOP Instance UID, ST. Every OBX-11
           ``P``; OBX-14 the SR's content date and time
=========  =====================================================================================

The Study Instance UID travels in an OBX, not in a ZDS segment: ZDS is a Z segment that IHE
Scheduled Workflow defines for order messages (OMI/ORM); an ORU^R01 that carries one no longer
validates against the standard structure (hl7apy's strict validation refuses it, and so do RIS
interfaces that validate), while an OBX coded with DICOM's own concept (DCM 110180, Study
Instance UID) is standard structure that every RIS stores with the result.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from ctcovid.errors import ConfigError, ReportError
from ctcovid.report import codes
from ctcovid.report.validate import iter_content, sr_summary

HL7_VERSION = "2.5.1"
UTF8_CHARSET = "UNICODE UTF-8"
# HL7 table 0027 (priority): stat, ASAP, routine, pre-op, callback, timing critical.
PRIORITY_CODES = frozenset({"S", "A", "R", "P", "C", "T"})
# Where a site's RIS reads the worklist priority: TQ component 6 of ORC-7 and OBR-27 (kept in
# 2.5.1 for backward compatibility, and what most RIS read), or TQ1-9 (2.5's own place).
PRIORITY_FIELDS = ("ORC-7", "OBR-27", "TQ1-9")
LABELS = ("covid", "non-covid", "indeterminate")
# Only a positive result raises the priority by default: a negative or indeterminate AI result
# must not lower a priority the ordering physician set, so nothing is said for it.
DEFAULT_PRIORITY = (("covid", "S"),)
DEFAULT_PRIORITY_FIELDS = ("ORC-7", "OBR-27")
# Local codes (HL7 "99" prefix) for the two values no public system names.
LOCAL_SYSTEM = "99CTCOVID"
_EVALUATION_CODES = {
    "present": codes.PRESENT,
    "absent": codes.ABSENT,
    "indeterminate": codes.INDETERMINATE,
}
_ALGORITHM_NAME = "111001"
_ALGORITHM_VERSION = "111003"
_ALGORITHM_PARAMETERS = "111002"
_SEXES = {"M": "M", "F": "F", "O": "O"}


@dataclass(frozen=True)
class OruSettings:
    """Who sends the ORU to whom, and how a result maps to the worklist priority.

    ``priority`` maps a result label (``covid``, ``non-covid``, ``indeterminate``) to an HL7
    table 0027 code, written to every field in ``priority_fields`` (``ORC-7``, ``OBR-27``:
    TQ component 6; ``TQ1-9``); a label not in the mapping leaves them empty. Default:
    positive -> ``S`` (stat) in ORC-7 and OBR-27, nothing for the others.
    """

    sending_application: str = "CTCOVID"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    priority: tuple[tuple[str, str], ...] = DEFAULT_PRIORITY
    priority_fields: tuple[str, ...] = DEFAULT_PRIORITY_FIELDS
    processing_id: str = "P"

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", tuple((str(k), str(v)) for k, v in self.priority))
        object.__setattr__(self, "priority_fields", tuple(self.priority_fields))
        for label, code in self.priority:
            if label not in LABELS:
                raise ConfigError(
                    f"hl7_priority names an unknown result {label!r}; results are "
                    f"{', '.join(LABELS)}."
                )
            if code not in PRIORITY_CODES:
                raise ConfigError(
                    f"hl7_priority {label}={code!r}: not an HL7 table 0027 priority "
                    f"({', '.join(sorted(PRIORITY_CODES))})."
                )
        for name in self.priority_fields:
            if name not in PRIORITY_FIELDS:
                raise ConfigError(
                    f"hl7_priority_fields: {name!r} is none of {', '.join(PRIORITY_FIELDS)}."
                )
        if self.processing_id not in ("P", "D", "T"):
            raise ConfigError(f"processing_id must be P, D or T. Received: {self.processing_id!r}.")

    def priority_of(self, label: str) -> str:
        """The priority code for a result ``label``; '' when the mapping says nothing."""
        return dict(self.priority).get(label, "")


def parse_priority(items: Iterable[str] | Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``["covid=S", ...]`` (flags, TOML list) or a TOML table as ``(label, code)`` pairs."""
    if isinstance(items, Mapping):
        return tuple((str(k), str(v)) for k, v in items.items())
    pairs = []
    for item in items:
        label, sep, code = str(item).partition("=")
        if not sep or not label.strip() or not code.strip():
            raise ConfigError(
                f"hl7_priority must be LABEL=CODE (e.g. covid=S). Received: {item!r}."
            )
        pairs.append((label.strip(), code.strip().upper()))
    return tuple(pairs)


@dataclass(frozen=True)
class Oru:
    """A built ORU: its control ID (MSH-10), the SR it reports and the encoded message."""

    control_id: str
    sr_sop_instance_uid: str
    result_status: str  # OBR-25: P or C
    text: str  # ER7, segments separated by carriage returns
    charset: str = field(default="")

    def to_bytes(self) -> bytes:
        """The message as sent: UTF-8 (ASCII for an ASCII-only message)."""
        return self.text.encode("utf-8")


def message_control_id(sr_sop_instance_uid: str) -> str:
    """MSH-10 for the ORU that reports the SR ``sr_sop_instance_uid``: the same for every
    send of that SR (a resend is recognisable as such), 20 characters as 2.5.1 allows."""
    return hashlib.sha256(sr_sop_instance_uid.encode("ascii")).hexdigest()[:20].upper()


def escape(text: str) -> str:
    """``text`` with HL7's delimiters escaped (2.5.1 section 2.7.4), for one leaf value."""
    out = text.replace("\\", "\\E\\")
    for char, code in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, code)
    # Segment and line breaks inside a value would end the segment.
    return re.sub(r"[\r\n]+", " ", out)


def build_oru(sr: Dataset, settings: OruSettings, *, corrected: bool = False) -> Oru:
    """The ORU^R01 that reports the ctcovid SR ``sr`` (a Comprehensive 3D SR, as built).

    ``corrected``: the RIS already accepted a result for this series, and this one replaces
    it (OBR-25 ``C``).

    Raises
    ------
    ReportError
        If the SR lacks what the message needs (naming the attribute), or the message fails
        hl7apy's strict validation.
    """
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.exceptions import HL7apyException

    sr_uid = str(sr.get("SOPInstanceUID", ""))
    if not sr_uid:
        raise ReportError("The SR has no SOPInstanceUID (0008,0018); cannot build its ORU")
    summary = sr_summary(sr)
    evaluation = summary["evaluation"]
    if evaluation not in _EVALUATION_CODES or summary["probability_covid"] is None:
        raise ReportError(
            f"SR {sr_uid}: no COVID-19 evaluation or probability in its content; cannot build "
            "its ORU"
        )
    texts = _text_values(sr)
    parameters = dict(
        p.partition("=")[::2] for p in texts.get(_ALGORITHM_PARAMETERS, []) if "=" in p
    )
    label = {"present": "covid", "absent": "non-covid"}.get(evaluation, "indeterminate")
    control_id = message_control_id(sr_uid)
    status = "C" if corrected else "P"
    reported_at = _sr_datetime(sr)
    try:
        msg = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
        _header(msg, settings, control_id, reported_at)
        result = msg.add_group("ORU_R01_PATIENT_RESULT")
        _patient(result.add_group("ORU_R01_PATIENT"), sr)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        priority = settings.priority_of(label)
        _order(order, sr, status, reported_at, priority, settings.priority_fields)
        observations: list[tuple[str, str, str, str]] = [
            ("CWE", _code(codes.COVID_19), _code(_EVALUATION_CODES[evaluation]), ""),
            ("NM", _code(codes.PROBABILITY), _number(summary["probability_covid"]), "1"),
        ]
        if "threshold" in parameters:
            threshold = f"threshold^Decision threshold^{LOCAL_SYSTEM}"
            observations.append(("NM", threshold, _number(float(parameters["threshold"])), "1"))
        for code, meaning in (
            (_ALGORITHM_NAME, "Algorithm Name"),
            (_ALGORITHM_VERSION, "Algorithm Version"),
        ):
            if texts.get(code):
                observations.append(("ST", f"{code}^{meaning}^DCM", escape(texts[code][0]), ""))
        observations.append(
            ("ST", "110180^Study Instance UID^DCM", escape(str(sr.StudyInstanceUID)), "")
        )
        observations.append(
            ("ST", f"sr_uid^SR SOP Instance UID^{LOCAL_SYSTEM}", escape(sr_uid), "")
        )
        for number, (kind, concept, value, unit) in enumerate(observations, start=1):
            obx = order.add_group("ORU_R01_OBSERVATION").obx
            obx.obx_1 = str(number)
            obx.obx_2 = kind
            obx.obx_3 = concept
            obx.obx_5 = value
            if unit:
                obx.obx_6 = "1^no units^UCUM"
            if number == 1 and evaluation == "present":
                obx.obx_8 = "A"
            obx.obx_11 = "P"
            if reported_at:
                obx.obx_14.ts_1 = reported_at
        text = msg.to_er7()
        charset = "" if text.isascii() else UTF8_CHARSET
        if charset:
            msg.msh.msh_18 = charset
            text = msg.to_er7()
        msg.validate()
    except HL7apyException as exc:
        raise ReportError(
            f"SR {sr_uid}: its ORU^R01 fails HL7 {HL7_VERSION} validation: {exc}"
        ) from exc
    return Oru(control_id, sr_uid, status, text, charset)


def parse_oru(text: str) -> Any:
    """``text`` parsed and validated strictly as an HL7 2.5.1 ORU^R01 (hl7apy ``Message``)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    msg = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT)
    msg.validate()
    return msg


def _header(msg: Any, settings: OruSettings, control_id: str, reported_at: str) -> None:
    msh = msg.msh
    for name, value in (
        ("msh_3", settings.sending_application),
        ("msh_4", settings.sending_facility),
        ("msh_5", settings.receiving_application),
        ("msh_6", settings.receiving_facility),
    ):
        if value:
            getattr(msh, name).hd_1 = escape(value)
    msh.msh_7.ts_1 = reported_at or "19000101"
    msh.msh_9.msg_1 = "ORU"
    msh.msh_9.msg_2 = "R01"
    msh.msh_9.msg_3 = "ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11.pt_1 = settings.processing_id
    msh.msh_12.vid_1 = HL7_VERSION


def _patient(group: Any, sr: Dataset) -> None:
    pid = group.pid
    patient_id = str(sr.get("PatientID", "") or "")
    if not patient_id:
        raise ReportError(
            f"SR {sr.SOPInstanceUID}: no PatientID (0010,0020); the RIS cannot file its ORU"
        )
    pid.pid_3.cx_1 = escape(patient_id)
    issuer = str(sr.get("IssuerOfPatientID", "") or "")
    if issuer:
        pid.pid_3.cx_4.hd_1 = escape(issuer)
    name = sr.get("PatientName")
    groups = _name_groups(name)
    for index, (components, representation) in enumerate(groups):
        xpn = pid.pid_5 if index == 0 else pid.add_field("pid_5")
        # DICOM PN: family^given^middle^prefix^suffix; HL7 XPN: family^given^middle^suffix^prefix
        family, given, middle, prefix, suffix = (components + [""] * 5)[:5]
        if family:
            xpn.xpn_1.fn_1 = escape(family)
        for part, value in (
            ("xpn_2", given),
            ("xpn_3", middle),
            ("xpn_4", suffix),
            ("xpn_5", prefix),
        ):
            if value:
                setattr(xpn, part, escape(value))
        if len(groups) > 1:
            xpn.xpn_8 = representation
    birth = str(sr.get("PatientBirthDate", "") or "")
    if re.fullmatch(r"\d{8}", birth):
        pid.pid_7.ts_1 = birth
    sex = _SEXES.get(str(sr.get("PatientSex", "") or "").upper())
    if sex:
        pid.pid_8 = sex


def _name_groups(name: Any) -> list[tuple[list[str], str]]:
    """The non-empty component groups of a DICOM PN: (components, XPN.8 code)."""
    if name is None or not str(name):
        return []
    groups = []
    for text, code in zip(str(name).split("="), ("A", "I", "P"), strict=False):
        if text.strip("^ "):
            groups.append((text.split("^"), code))
    return groups


def _order(
    order: Any,
    sr: Dataset,
    status: str,
    reported_at: str,
    priority: str,
    priority_fields: Sequence[str],
) -> None:
    requests = list(sr.get("ReferencedRequestSequence") or [])
    request = requests[0] if requests else Dataset()
    accession = str(sr.get("AccessionNumber", "") or "")
    placer = str(request.get("PlacerOrderNumberImagingServiceRequest", "") or "")
    filler = str(request.get("FillerOrderNumberImagingServiceRequest", "") or "") or accession
    procedure_id = str(request.get("RequestedProcedureID", "") or "")
    orc, obr = order.orc, order.obr
    orc.orc_1 = "RE"
    if placer:
        orc.orc_2.ei_1 = escape(placer)
        obr.obr_2.ei_1 = escape(placer)
    if filler:
        orc.orc_3.ei_1 = escape(filler)
        obr.obr_3.ei_1 = escape(filler)
    obr.obr_1 = "1"
    obr.obr_4 = _code(codes.CT_CHEST)
    studied_at = _datetime(sr.get("StudyDate"), sr.get("StudyTime"), None)
    if studied_at:
        obr.obr_7.ts_1 = studied_at
    if accession:
        obr.obr_18 = escape(accession)
    if procedure_id:
        obr.obr_19 = escape(procedure_id)
    if reported_at:
        obr.obr_22.ts_1 = reported_at
    obr.obr_24 = "CT"
    obr.obr_25 = status
    if priority:
        if "ORC-7" in priority_fields:
            orc.orc_7.tq_6 = priority
        if "OBR-27" in priority_fields:
            obr.obr_27.tq_6 = priority
        if "TQ1-9" in priority_fields:
            order.add_group("ORU_R01_TIMING_QTY").tq1.tq1_9.cwe_1 = priority


def _code(concept: Any) -> str:
    return f"{concept.value}^{escape(str(concept.meaning))}^{concept.scheme_designator}"


def _number(value: float) -> str:
    return f"{value:.6g}"


def _text_values(sr: Dataset) -> dict[str, list[str]]:
    """TEXT content items by concept code value (TID 4019: algorithm name, version, ...)."""
    found: dict[str, list[str]] = {}
    for item in iter_content(sr.get("ContentSequence")):
        if item.get("ValueType") != "TEXT" or not item.get("ConceptNameCodeSequence"):
            continue
        code = str(item.ConceptNameCodeSequence[0].CodeValue)
        found.setdefault(code, []).append(str(item.get("TextValue", "")))
    return found


def _sr_datetime(sr: Dataset) -> str:
    return _datetime(sr.get("ContentDate"), sr.get("ContentTime"), sr.get("TimezoneOffsetFromUTC"))


def _datetime(date: Any, time: Any, offset: Any) -> str:
    """DICOM DA, TM and TimezoneOffsetFromUTC as an HL7 DTM (to the second); '' without a date."""
    day = str(date or "")
    if not re.fullmatch(r"\d{8}", day):
        return ""
    clock = re.match(r"(?:\d{2}){1,3}", str(time or "").replace(":", ""))
    text = day + (clock.group(0) if clock else "")
    zone = str(offset or "")
    if re.fullmatch(r"[+-]\d{4}", zone):
        text += zone
    return text
