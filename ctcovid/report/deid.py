"""De-identification of the objects ctcovid makes (SRs, Secondary Captures), with keyed pseudonyms.

A research export must not name the patient, yet results of one patient must stay linkable
across studies and runs, and the SR's references must still point at the (remapped) images. So
every identifier is replaced by a keyed digest (HMAC-SHA256 with a secret key the site keeps):
the same key gives the same pseudonyms, UIDs and date shifts in every run; without the key they
cannot be reversed or recomputed from a guessed patient ID.

- Patient ID, Patient's Name, Accession Number: ``pseudonym()`` (16 hex digits; fits a SH).
- UIDs (study, series, instance, evidence, references in the content tree, device, tracking):
  ``uid()``, a ``2.25`` UID from the digest, laid out as an RFC 9562 version-8 UUID.
- Dates: every date and date-time moves back by a per-patient number of whole days
  (``day_offset()``, 1 to 10 years) so intervals, ages and times of day stay true.

The attribute rules are PS3.15 Annex E, Basic Application Level Confidentiality Profile
(``annex_e.py``: Table E.1-1 as data), with two options: Retain Longitudinal Temporal
Information with Modified Dates (the dates above) and Clean Structured Content (the SR content
tree is kept: its codes, numbers and ctcovid's own text items; its UIDs remapped, any other text
replaced). The Retain UIDs option is not used: UIDs are remapped. Private attributes are removed
(no Retain Safe Private). Where the table leaves a choice (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``)
we take the one that keeps any IOD valid: zero length for ``X/Z``, a dummy otherwise.

Stricter than the table in one place: the patient and study modules that an SR or Secondary
Capture copies whole from its source. An attribute of theirs that the table does not list
(calendar dates that cannot be shifted, species, strain and breed descriptions, site procedure
and request codes, issuers of accession numbers, body measurements) is removed, as Annex E
allows, unless ``_KEPT_FROM_SOURCE`` names it: the table was written for attributes known to
identify, and free text of the source is where a name or an ID turns up unannounced.

Why not a library of the field: dicognito 0.19 keys its replacements with MD5 of seed and value
(not a keyed MAC), shifts all dates by one offset per run rather than per patient, keeps private
attributes and free text such as descriptions and comments; deid 0.4 is a recipe language
whose default recipe screens pixel data, and would need our own functions for every keyed
replacement anyway (and brings matplotlib). pydicom with the standard's table as data does
exactly the profile, and the table is reviewable line by line.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import logging
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

from ctcovid.dicom.modules import COPIED_KEYWORDS
from ctcovid.errors import ConfigError, ReportError
from ctcovid.report.annex_e import (
    BASIC_PROFILE,
    CLEANED_STRUCTURED_CONTENT,
    MODIFIED_DATES,
    REPEATING_GROUPS,
)

logger = logging.getLogger(__name__)

MIN_KEY_BYTES = 32
PSEUDONYM_HEX_DIGITS = 16  # 64 bits: a SH (Accession Number) holds 16 characters
MIN_SHIFT_DAYS = 365
MAX_SHIFT_DAYS = 3652

#: PS3.16 CID 7050 codes of the profile and the options this module applies, in
#: DeidentificationMethodCodeSequence.
METHOD_CODES: tuple[tuple[str, str], ...] = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113104", "Clean Structured Content Option"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
#: DeidentificationMethod (LO, one value per line of at most 64 characters).
METHOD_TEXT: tuple[str, ...] = (
    "ctcovid research export",
    "PS3.15 Annex E Basic Profile",
    "Clean Structured Content",
    "Retain Longitudinal Temporal Information Modified Dates",
    "Keyed HMAC-SHA256 pseudonyms and 2.25 UIDs",
)

DUMMY_TEXT = "ANONYMIZED"
_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_NUMBER_TEXT_VRS = frozenset({"DS", "IS"})

#: TEXT content items that ctcovid itself writes (TID 1500, 1501, 4019 and the observer
#: context): their values are the algorithm's name, version and settings and the tracking
#: identifier, never the patient's. Every other TEXT item is replaced under Clean Structured
#: Content.
OWN_TEXT_CONCEPTS: frozenset[tuple[str, str]] = frozenset(
    {
        ("112039", "DCM"),  # Tracking Identifier
        ("111001", "DCM"),  # Algorithm Name
        ("111003", "DCM"),  # Algorithm Version
        ("111002", "DCM"),  # Algorithm Parameters
        ("122405", "DCM"),  # Algorithm Manufacturer
        ("121012", "DCM"),  # Device Observer UID (as text in some templates)
        ("121013", "DCM"),  # Device Observer Name
        ("121014", "DCM"),  # Device Observer Manufacturer
        ("121015", "DCM"),  # Device Observer Model Name
        ("121016", "DCM"),  # Device Observer Serial Number
        ("121017", "DCM"),  # Device Observer Physical Location During Observation
    }
)

_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_ACCESSION = 0x00080050
_OTHER_PATIENT_IDS = 0x00101000
_TEXT_VALUE = 0x0040A160
_VALUE_TYPE = 0x0040A040
_CONCEPT_NAME = 0x0040A043
_CONTENT_SEQUENCE = 0x0040A730
#: Replaced by keyed pseudonyms rather than emptied (the table says Z): linkable for research.
_PSEUDONYMISED = {_PATIENT_ID: "PatientID", _PATIENT_NAME: "PatientID", _ACCESSION: "Accession"}
#: Attributes of the copied patient and study modules that the table does not list and that
#: are kept all the same: codes and flags that say nothing of the patient, and the marks this
#: module sets itself.
_KEPT_FROM_SOURCE = frozenset(
    {
        "TypeOfPatientID",
        "QualityControlSubject",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalEventType",
    }
)
_REMOVED_FROM_SOURCE = frozenset(
    int(tag)
    for keyword in COPIED_KEYWORDS
    if keyword not in _KEPT_FROM_SOURCE
    and (tag := pydicom.datadict.tag_for_keyword(keyword)) is not None
    and int(tag) not in BASIC_PROFILE
)
#: Where the table's action would leave an object invalid, the nearest action that keeps it valid.
_OVERRIDES: dict[int, str] = {
    # Type 2 in the SR's Referenced Request Sequence (the table says X): kept, empty.
    0x00401001: "Z",  # Requested Procedure ID
    # The site's procedure codes in a request, Type 2 there too; unlisted, so emptied.
    0x00321064: "Z",  # Requested Procedure Code Sequence
    # Type 1C, only beside the approval number, which the table removes (D there): removed.
    0x00120081: "X",  # Clinical Trial Protocol Ethics Committee Name
}
#: Values that must not survive anywhere in a de-identified object (checked on its bytes).
_LEAK_CHECKED = (_PATIENT_ID, _PATIENT_NAME, _ACCESSION, _OTHER_PATIENT_IDS)


@dataclass(frozen=True)
class PseudonymKey:
    """The secret of a research export; every pseudonym, UID and date shift derives from it.

    The key never leaves this object: ``repr`` hides it, and what is written (pseudonyms,
    UIDs, ``key_id``) is an HMAC output from which it cannot be recovered.
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise ConfigError(
                f"the pseudonymisation key has {len(self.secret)} bytes; at least "
                f"{MIN_KEY_BYTES} are needed (make one with: openssl rand -hex 32 > research.key)"
            )

    @classmethod
    def from_file(cls, path: Path | str) -> PseudonymKey:
        """The key in ``path``: its bytes, less one trailing newline (``openssl rand -hex 32``
        writes 64 hex characters and a newline; the characters are the key).

        Raises
        ------
        ConfigError
            If the file is missing or unreadable, or the key is shorter than 32 bytes.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no such key file (make one with: openssl rand -hex 32 > {path.name})"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the key file ({exc.strerror})") from None
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        if len(data) < MIN_KEY_BYTES:
            raise ConfigError(
                f"{path}: the key has {len(data)} bytes; at least {MIN_KEY_BYTES} are needed "
                f"(make one with: openssl rand -hex 32 > {path.name})"
            )
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "%s can be read by other users; keep the pseudonymisation key private (chmod 600)",
                path,
            )
        return cls(data)

    def digest(self, domain: str, value: str) -> bytes:
        """HMAC-SHA256 of ``value`` under the key, separated by ``domain`` (an accession
        number equal to a patient ID gives another pseudonym, and a UID another digest)."""
        message = domain.encode("ascii") + b"\x00" + value.encode("utf-8")
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def pseudonym(self, domain: str, value: str) -> str:
        """``value``'s pseudonym: 16 upper-case hex digits (empty for an empty value)."""
        if not value:
            return ""
        return self.digest(domain, value).hex().upper()[:PSEUDONYM_HEX_DIGITS]

    def uid(self, uid: str) -> str:
        """The ``2.25`` UID that stands for ``uid``: the digest's first 16 bytes as a version-8
        UUID (RFC 9562 custom UUIDs; ISO/IEC 9834-8 makes any UUID a UID under 2.25)."""
        if not uid:
            return ""
        raw = bytearray(self.digest("UID", uid)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
        return f"2.25.{int.from_bytes(raw, 'big')}"

    def day_offset(self, patient_id: str) -> int:
        """Days (negative: back in time) that this patient's dates move; 1 to 10 years."""
        n = int.from_bytes(self.digest("DateShift", patient_id)[:8], "big")
        return -(MIN_SHIFT_DAYS + n % (MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1))

    @property
    def key_id(self) -> str:
        """A name for the key that reveals nothing of it: two exports with the same ``key_id``
        used the same key, so their pseudonyms can be joined."""
        return self.digest("KeyId", "ctcovid").hex()[:16]


def shift_date(value: str, days: int) -> str | None:
    """A DA value (``YYYYMMDD``) moved by ``days``; None if it is not a date we can move."""
    text = value.strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        moved = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8])) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return moved.strftime("%Y%m%d")


def shift_datetime(value: str, days: int) -> str | None:
    """A DT value moved by ``days``: its date part moves, time and offset stay; None if it has
    no full date (``YYYYMMDD``) to move."""
    text = value.strip()
    moved = shift_date(text[:8], days)
    if moved is None:
        return None
    return moved + text[8:]


def _profile_action(tag: BaseTag) -> str | None:
    """The action for ``tag`` with our options applied; None when the table does not list it."""
    number = int(tag)
    if tag.is_private:
        return "X"
    if number in MODIFIED_DATES:
        return "C"
    if number in CLEANED_STRUCTURED_CONTENT:
        return "C"
    if number in _REMOVED_FROM_SOURCE:
        return "X"
    if number in _OVERRIDES:
        return _OVERRIDES[number]
    action = BASIC_PROFILE.get(number)
    if action is None:
        for mask, value, repeating in REPEATING_GROUPS:
            if number & mask == value:
                return repeating
        return None
    if action.startswith("X/Z/U"):
        return "U"
    if action == "X/Z":
        return "Z"
    if "D" in action:
        return "D"
    return action


@dataclass
class _Context:
    key: PseudonymKey
    patient_id: str
    days: int
    leaks: dict[str, str] = field(default_factory=dict)  # value -> the attribute it came from


class Deidentifier:
    """Makes de-identified copies of ctcovid's SRs and Secondary Captures with one key."""

    def __init__(self, key: PseudonymKey):
        self.key = key

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (the original is not changed).

        Raises
        ------
        ReportError
            If an identifying value of the original is still in the encoded copy (named by
            attribute, never by value), or the copy cannot be encoded.
        """
        out = copy.deepcopy(ds)
        patient_id = str(ds.get("PatientID", "") or "")
        context = _Context(self.key, patient_id, self.key.day_offset(patient_id))
        self._clean(out, context, in_content=False)
        self._mark(out)
        self._file_meta(out, ds)
        self._check(out, context)
        return out

    # -- the walk ---------------------------------------------------------------------------

    def _clean(self, ds: Dataset, context: _Context, *, in_content: bool) -> None:
        for elem in list(ds):
            self._element(ds, elem, context, in_content=in_content)
        if in_content:
            self._clean_text_item(ds)

    def _element(
        self, ds: Dataset, elem: DataElement, context: _Context, *, in_content: bool
    ) -> None:
        tag = elem.tag
        number = int(tag)
        if number in _LEAK_CHECKED:
            self._remember(elem, context)
        if number in _PSEUDONYMISED:
            domain = _PSEUDONYMISED[number]
            # The name becomes the ID's pseudonym: a viewer shows something linkable.
            source = context.patient_id if number == _PATIENT_NAME else str(elem.value or "")
            pseudonym = self.key.pseudonym(domain, source)
            if number == _PATIENT_NAME and pseudonym:
                pseudonym += "^"  # a family name alone, in the PN form validators expect
            elem.value = pseudonym
            return
        action = _profile_action(tag)
        if elem.VR == "SQ":
            inside = in_content or number == _CONTENT_SEQUENCE
            self._sequence(ds, elem, action, context, in_content=inside)
            return
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = None
        elif action == "U" or (action is None and elem.VR == "UI" and _is_instance_uid(tag)):
            self._remap_uids(elem, context)
        elif elem.VR in ("DA", "DT"):
            # Every date moves, listed or not: one forgotten date would undo the shift.
            self._shift(ds, elem, context)
        elif action == "C":
            # Under Modified Dates: a time (TM) and the time zone (SH) stay true with whole-day
            # shifts; a binary timestamp (OB) cannot be shifted here, so it goes.
            if elem.VR not in ("TM", "SH"):
                del ds[tag]
        elif action == "D":
            self._dummy(ds, elem, context)

    def _sequence(
        self,
        ds: Dataset,
        elem: DataElement,
        action: str | None,
        context: _Context,
        *,
        in_content: bool,
    ) -> None:
        if action == "X":
            del ds[elem.tag]
            return
        if action == "Z":
            elem.value = []
            return
        # Kept (K), cleaned (C, D on a sequence) or remapped (U*): the rules go on inside.
        for item in elem.value:
            self._clean(item, context, in_content=in_content)

    def _remap_uids(self, elem: DataElement, context: _Context) -> None:
        if not elem.value:
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        for value in values:
            context.leaks.setdefault(str(value), elem.keyword or str(elem.tag))
        mapped = [context.key.uid(str(v)) for v in values]
        elem.value = mapped if elem.VM > 1 else mapped[0]

    def _shift(self, ds: Dataset, elem: DataElement, context: _Context) -> None:
        if not elem.value:
            return
        shift = shift_date if elem.VR == "DA" else shift_datetime
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        moved = [shift(str(v), context.days) for v in values]
        if any(m is None for m in moved):
            # A value we cannot read as a date cannot be moved: it goes, and the log says which.
            logger.warning("removed %s %s: not a date that can be shifted", elem.keyword, elem.tag)
            del ds[elem.tag]
            return
        elem.value = moved if len(moved) > 1 else moved[0]

    def _dummy(self, ds: Dataset, elem: DataElement, context: _Context) -> None:
        if elem.VR == "UI":
            self._remap_uids(elem, context)
        elif elem.VR in _TEXT_VRS:
            if elem.value:
                elem.value = DUMMY_TEXT
        elif elem.VR in _NUMBER_TEXT_VRS:
            if elem.value not in (None, ""):
                elem.value = "0"
        elif elem.VR == "TM":
            pass  # times stay true (whole-day shifts)
        else:  # binary values, codes: nothing safe to put in their place
            del ds[elem.tag]

    def _clean_text_item(self, item: Dataset) -> None:
        """Clean Structured Content: a TEXT item keeps its value only if ctcovid wrote it."""
        if item.get("ValueType") != "TEXT" or _TEXT_VALUE not in item:
            return
        names = item.get("ConceptNameCodeSequence") or []
        concept = (
            (str(names[0].get("CodeValue", "")), str(names[0].get("CodingSchemeDesignator", "")))
            if names
            else None
        )
        if concept not in OWN_TEXT_CONCEPTS:
            item.TextValue = DUMMY_TEXT

    def _remember(self, elem: DataElement, context: _Context) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                for inner in item:
                    if inner.VR in _TEXT_VRS and inner.value:
                        context.leaks.setdefault(str(inner.value), elem.keyword)
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        for value in values:
            if value:
                context.leaks.setdefault(str(value), elem.keyword)

    # -- the marks of a de-identified object ------------------------------------------------

    @staticmethod
    def _mark(ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = list(METHOD_TEXT)
        items = []
        for value, meaning in METHOD_CODES:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = items
        ds.LongitudinalTemporalInformationModified = "MODIFIED"

    @staticmethod
    def _file_meta(out: Dataset, original: Dataset) -> None:
        """New file meta: the original's names the sending application and the old UID."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.SOPClassUID
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = original.file_meta.TransferSyntaxUID
        out.file_meta = meta

    @staticmethod
    def _check(out: Dataset, context: _Context) -> None:
        encoded = encode(out)
        for value, keyword in context.leaks.items():
            # Short values (a one-letter name component, "1") match by chance; IDs and UIDs
            # of interest are longer.
            if len(value) < 4:
                continue
            for form in _encodings(value):
                if _contains_value(encoded, form):
                    raise ReportError(
                        f"SOP instance {out.SOPInstanceUID}: the original value of {keyword} "
                        "is still in the de-identified object; it was not written"
                    )


_VALUE_CHARS = frozenset(b"0123456789.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _contains_value(data: bytes, value: bytes) -> bool:
    """Whether ``value`` is in ``data`` as a whole value, not inside a longer one (UID
    ``1.2.3`` inside ``1.2.34``, ID ``P1`` inside ``P12``)."""
    start = data.find(value)
    while start >= 0:
        end = start + len(value)
        before = data[start - 1] if start > 0 else None
        after = data[end] if end < len(data) else None
        if before not in _VALUE_CHARS and after not in _VALUE_CHARS:
            return True
        start = data.find(value, start + 1)
    return False


def _encodings(value: str) -> Iterable[bytes]:
    yield value.encode("utf-8", errors="ignore")
    yield value.encode("latin-1", errors="ignore")


def _is_instance_uid(tag: BaseTag) -> bool:
    """UIDs the table does not list but that name an instance of data, not a class or a
    syntax: remapped all the same (class, syntax and coding-scheme UIDs stay)."""
    keyword = pydicom.datadict.keyword_for_tag(tag)
    return keyword.endswith("InstanceUID") or keyword in {"DeviceUID", "TrackingUID"}


def encode(ds: Dataset) -> bytes:
    """``ds`` as the Part 10 bytes that are written (with preamble and file meta)."""
    buffer = BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception as exc:  # pydicom raises many kinds for a value it cannot encode
        raise ReportError(
            f"SOP instance {ds.get('SOPInstanceUID', '?')}: cannot be encoded after "
            f"de-identification ({exc})"
        ) from exc
    return buffer.getvalue()


def deidentify_file(source: Path, target: Path, deidentifier: Deidentifier) -> Dataset:
    """Read ``source``, write its de-identified copy to ``target`` atomically; the copy."""
    from ctcovid.fsio import write_atomic

    try:
        ds = pydicom.dcmread(source)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ReportError(f"{source}: cannot be read as DICOM ({exc})") from exc
    out = deidentifier.deidentify(ds)
    write_atomic(target, encode(out))
    return out
