"""A bounded fuzz campaign against the node's listener: malformed and edge-case C-STOREs.

Starts the listener alone in a child process on 127.0.0.1 and sends it ``count`` data sets over
real associations (raw sockets speaking DICOM, so any byte can be sent), with a C-ECHO every few
data sets. Afterwards it asserts what the node promises whatever a peer sends:

- the listener is up, C-ECHO answers, and SIGTERM stops it (exit 0) within 10 s;
- nothing was written outside the store (the listener's TMPDIR stays empty; every file under
  ``instances/`` is named by UIDs);
- every instance answered 0x0000 is on disk and in the job database;
- no handler failed unexpectedly (0x0110) and no traceback reached the log;
- the listener's peak resident memory stayed under 512 MiB.

Run it with ``make fuzz FUZZ_COUNT=10000 FUZZ_SEED=1 FUZZ_SECONDS=900`` or directly::

    python tests/fuzz_node.py --count 2000 --seed 3 --time-limit 300 --work /tmp/fuzz

The test suite runs a small campaign (``test_node_scp.py::test_fuzz_campaign``).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import socket
import struct
import sys
import time
import warnings
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import pydicom  # noqa: E402
from node_helpers import (  # noqa: E402
    ListenerProcess,
    c_echo_pdus,
    c_store_pdus,
    raw_associate,
    read_dimse_status,
    release,
)
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MEMORY_LIMIT_MB = 512.0
STOP_SECONDS = 10.0
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Context IDs of the association: CT explicit, CT implicit, enhanced CT explicit, verification.
CONTEXTS = (
    (CT, (EXPLICIT_LE,)),
    (CT, (IMPLICIT_LE,)),
    (ENHANCED_CT, (EXPLICIT_LE,)),
    (VERIFICATION, (IMPLICIT_LE,)),
)
CX_CT_EXPLICIT, CX_CT_IMPLICIT, CX_ENHANCED, CX_ECHO = 1, 3, 5, 7


@dataclass
class Case:
    """One C-STORE to send: the data set bytes and what the request says about them."""

    kind: str
    data: bytes
    sop_instance: str
    sop_class: str = CT
    context_id: int = CX_CT_EXPLICIT


@dataclass
class Report:
    sent: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    cut: int = 0  # associations the listener ended (a protocol violation it refused)
    echoes: int = 0
    stored: set[str] = field(default_factory=set)
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    stop_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "seconds": round(self.seconds, 1),
            "statuses": dict(sorted(self.statuses.items())),
            "kinds": dict(sorted(self.kinds.items())),
            "associations_cut": self.cut,
            "echoes": self.echoes,
            "stored_unique": len(self.stored),
            "listener_peak_rss_mb": round(self.peak_rss_mb, 1),
            "stop_seconds": round(self.stop_seconds, 2),
            "problems": self.problems,
            "notes": self.notes,
        }


# -- data sets --------------------------------------------------------------------------------


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


def base_ct(rng: random.Random, serial: int) -> Dataset:
    """A small valid CT instance with the structure worth breaking (sequences, text, private)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = f"2.25.{rng.getrandbits(96)}{serial}"
    ds.StudyDate, ds.Modality = "20260101", "CT"
    ds.Manufacturer = "FUZZ"
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPClassUID = CT
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = f"2.25.{rng.getrandbits(64)}"
    ds.PatientName, ds.PatientID = "FUZZ^PATIENT", "FUZZ-0001"
    ds.StudyInstanceUID = f"2.25.{1000 + serial % 7}"
    ds.SeriesInstanceUID = f"2.25.{2000 + serial % 13}"
    ds.InstanceNumber = serial
    ds.ImagePositionPatient = [0, 0, -serial]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.add_new(0x00091010, "LO", "FUZZ PRIVATE")
    ds.add_new(0x00091011, "OB", bytes(rng.getrandbits(8) for _ in range(16)))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = bytes(rng.getrandbits(8) for _ in range(512))
    return ds


def _tagged(data: bytes) -> list[int]:
    """Offsets of plausible Explicit VR element headers in ``data`` (even group, two letters)."""
    offsets = []
    for match in re.finditer(rb"[\x00-\xff]{4}[A-Z]{2}", data):
        offsets.append(match.start())
    return offsets


Mutator = Callable[[random.Random, Dataset, bytes], tuple[bytes, str | None]]


def m_valid(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    return data, None


def m_flip(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    out = bytearray(data)
    for _ in range(rng.randint(1, 24)):
        out[rng.randrange(len(out))] = rng.getrandbits(8)
    return bytes(out), None


def m_truncate(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    return data[: rng.randrange(len(data))], None


def m_length(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """An element length rewritten: huge, odd, undefined, or off by a little."""
    out = bytearray(data)
    offsets = _tagged(data)
    if not offsets:
        return data, None
    at = rng.choice(offsets)
    value = rng.choice([0xFFFF, 0xFFFE, 1, 3, 0, rng.getrandbits(16)])
    out[at + 6 : at + 8] = struct.pack("<H", value)
    if rng.random() < 0.3:  # a long-form VR's 32-bit length
        out[at + 8 : at + 12] = struct.pack("<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFF0]))
    return bytes(out), None


def m_swallow(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """A UI element whose length swallows what follows (the patient's name, say)."""
    tag = rng.choice([b"\x08\x00\x18\x00UI", b"\x20\x00\x0d\x00UI", b"\x20\x00\x0e\x00UI"])
    at = data.find(tag)
    if at < 0:
        return data, None
    grow = rng.randint(2, 200)
    length = struct.unpack("<H", data[at + 6 : at + 8])[0] + grow
    return data[: at + 6] + struct.pack("<H", length & 0xFFFF) + data[at + 8 :], None


def m_endless_sequence(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """An undefined-length sequence (or item) that never ends, with noise after it."""
    noise = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
    seq = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"
    if rng.random() < 0.5:
        seq += b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # an item of undefined length too
    at = rng.choice(_tagged(data) or [0])
    return data[:at] + seq + noise, None


def m_deep_nesting(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """Sequences nested hundreds deep (a recursion bomb for a recursive parser)."""
    depth = rng.choice([50, 200, 1000])
    body = b""
    for _ in range(depth):
        body = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff" + body
    return data + body, None


def m_uid(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """SOP/Study/Series Instance UIDs at and past the rules' edges."""
    choices = [
        "1." + "2" * 62,  # 64 characters: valid
        "1." + "2" * 63,  # 65: invalid
        "",
        "../../../tmp/fuzz_escape",
        "1.2.3\x00",
        "1.2..3",
        ".1.2",
        "1.2.3 ",
        "1.02.3",
        "1.2.3\\4.5",
        "DOE^JOHN",
        "1.2.3/../4",
    ]
    which = rng.choice(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
    value = rng.choice(choices)
    copy = deepcopy(ds)
    raw = value.encode("latin-1")
    if len(raw) % 2:
        raw += b"\0"
    copy[which] = pydicom.DataElement(copy[which].tag, "UI", raw)
    request = value if which == "SOPInstanceUID" else None
    return _encode_raw(copy), request


def _encode_raw(ds: Dataset) -> bytes:
    """Encode without pydicom's value checks (values given as bytes)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


def m_missing(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    copy = deepcopy(ds)
    for keyword in rng.sample(
        ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "PixelData", "SOPInstanceUID"],
        rng.randint(1, 2),
    ):
        delattr(copy, keyword)
    return _encode(copy), None


def m_duplicate_tags(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """Elements repeated and out of order (the standard requires ascending, unique tags)."""
    offsets = _tagged(data)
    if len(offsets) < 4:
        return data, None
    a, b = sorted(rng.sample(offsets, 2))
    chunk = data[a:b]
    return data[:b] + chunk + data[b:], None


def m_pixels(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """Pixel data that disagrees with its description, or bogus encapsulation."""
    copy = deepcopy(ds)
    choice = rng.randrange(4)
    if choice == 0:
        copy.Rows, copy.Columns = 65535, 65535  # declares 8 GiB, carries 512 bytes
    elif choice == 1:
        copy.PixelData = b"\x01"
    elif choice == 2:
        copy.NumberOfFrames = 2**31 - 1
    else:  # encapsulated fragments in a native syntax, with a broken offset table
        pixels = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
        return data + pixels + b"\xfe\xff\x00\xe0\x08\x00\x00\x00", None
    return _encode(copy), None


def m_garbage(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 4096))), None


def m_private_un(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    """Private elements with VR UN of undefined length, with or without a sequence inside."""
    inner = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x10\x00\x10\x00PN\x04\x00X^Y " + (
        b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" if rng.random() < 0.5 else b""
    )
    element = b"\x09\x00\x20\x10UN\x00\x00\xff\xff\xff\xff" + inner
    if rng.random() < 0.5:
        element += b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    at = data.find(b"\x09\x00\x11\x10")
    at = at if at >= 0 else len(data)
    return data[:at] + element + data[at:], None


def m_charset(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    copy = deepcopy(ds)
    copy.SpecificCharacterSet = rng.choice(
        ["ISO 2022 IR 87", "\\ISO 2022 IR 149", "GB18030", "NOT A CHARSET", "ISO_IR 192"]
    )
    copy.add_new(0x00100010, "PN", bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))))
    return _encode_raw(copy), None


def m_sop_class(rng: random.Random, ds: Dataset, data: bytes) -> tuple[bytes, str | None]:
    copy = deepcopy(ds)
    copy.SOPClassUID = rng.choice([MR, ENHANCED_CT, "1.2.3.4"])
    return _encode(copy), None


MUTATORS: dict[str, tuple[float, Mutator]] = {
    "valid": (3.0, m_valid),
    "flip": (3.0, m_flip),
    "truncate": (1.5, m_truncate),
    "length": (2.0, m_length),
    "swallow": (1.0, m_swallow),
    "endless_sequence": (1.0, m_endless_sequence),
    "deep_nesting": (0.5, m_deep_nesting),
    "uid": (1.5, m_uid),
    "missing": (1.0, m_missing),
    "duplicate_tags": (1.0, m_duplicate_tags),
    "pixels": (1.0, m_pixels),
    "garbage": (0.7, m_garbage),
    "private_un": (0.7, m_private_un),
    "charset": (0.7, m_charset),
    "sop_class": (0.5, m_sop_class),
}


def make_case(rng: random.Random, serial: int) -> Case:
    names = list(MUTATORS)
    kind = rng.choices(names, weights=[MUTATORS[n][0] for n in names])[0]
    ds = base_ct(rng, serial)
    sop = str(ds.SOPInstanceUID)
    data, request_sop = MUTATORS[kind][1](rng, ds, _encode(ds))
    sop = request_sop if request_sop is not None else sop
    case = Case(kind, data, sop)
    roll = rng.random()
    if roll < 0.05:  # Explicit VR bytes on an Implicit VR context
        case.context_id = CX_CT_IMPLICIT
    elif roll < 0.08:  # the request names another class than the context
        case.sop_class, case.context_id = ENHANCED_CT, CX_ENHANCED
    elif roll < 0.10:  # a request UID that is not the data set's
        case.sop_instance = rng.choice(["1.2.3", "", "x" * 64, sop + ".1"])
    return case


# -- the campaign -------------------------------------------------------------------------------


def _echo(sock: socket.socket, message_id: int) -> int:
    for pdu in c_echo_pdus(CX_ECHO, message_id):
        sock.sendall(pdu)
    return read_dimse_status(sock)


def _stored_in_database(store_dir: Path) -> dict[str, Path]:
    from ctcovid.node.store import Store

    store = Store(store_dir)
    try:
        found: dict[str, Path] = {}
        for record in store.jobs.list_series():
            for path in store.instance_paths(
                record.series_instance_uid, record.study_instance_uid
            ):
                found[path.stem] = path
        return found
    finally:
        store.close()


def run_campaign(
    work: Path, *, count: int, seed: int, time_limit_s: float = 600.0, per_association: int = 25
) -> Report:
    """Send ``count`` cases (or until ``time_limit_s``); check the node's promises; a Report."""
    # Building invalid data sets on purpose makes pydicom warn here; the listener's log counts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_campaign(work, count, seed, time_limit_s, per_association)


def _run_campaign(
    work: Path, count: int, seed: int, time_limit_s: float, per_association: int
) -> Report:
    work.mkdir(parents=True, exist_ok=True)
    sentinel_tmp = work / "listener-tmpdir"
    sentinel_tmp.mkdir(exist_ok=True)
    store_dir = work / "store"
    report = Report()
    listener = ListenerProcess(
        store_dir, work / "listener.log", network_timeout_seconds=10, max_instance_mb=16,
        extra_env={"TMPDIR": str(sentinel_tmp)},
    )
    rng = random.Random(seed)
    started = time.monotonic()
    sock: socket.socket | None = None
    in_association = 0
    try:
        for serial in range(count):
            if time.monotonic() - started > time_limit_s:
                report.notes.append(f"time limit reached after {serial} cases")
                break
            if sock is None:
                sock = raw_associate(listener.port, contexts=CONTEXTS, max_pdu=65536)
                in_association = 0
            case = make_case(rng, serial)
            report.kinds[case.kind] += 1
            report.sent += 1
            try:
                pdus = c_store_pdus(
                    case.data, sop_class=case.sop_class, sop_instance=case.sop_instance,
                    context_id=case.context_id, max_pdu=rng.choice([4096, 16384, 65536]),
                    message_id=serial % 65536,
                )
                for pdu in pdus:
                    sock.sendall(pdu)
                status = read_dimse_status(sock)
            except (OSError, ConnectionError):
                report.cut += 1
                report.statuses["cut"] += 1
                sock.close()
                sock = None
                continue
            report.statuses[f"0x{status:04X}"] += 1
            if status == 0:
                # UI values are padded with NUL; trailing padding is no part of the UID.
                report.stored.add(case.sop_instance.rstrip("\0 "))
            in_association += 1
            if serial % 10 == 9:
                if _echo(sock, 60000 + serial % 1000) != 0:
                    report.problems.append(f"C-ECHO failed after case {serial}")
                report.echoes += 1
            if in_association >= per_association:
                release(sock)
                sock = None
        if sock is not None:
            release(sock)
            sock = None
        # A fresh association still works at the end.
        final = raw_associate(listener.port, contexts=CONTEXTS)
        if _echo(final, 1) != 0:
            report.problems.append("final C-ECHO failed")
        report.echoes += 1
        release(final)
        report.seconds = time.monotonic() - started
        if not listener.alive():
            report.problems.append("the listener died")
        report.peak_rss_mb = listener.peak_rss_mb()
        t0 = time.monotonic()
        code = listener.terminate(timeout=60)
        report.stop_seconds = time.monotonic() - t0
        if code != 0:
            report.problems.append(f"the listener exited with {code}")
        if report.stop_seconds > STOP_SECONDS:
            report.problems.append(f"SIGTERM took {report.stop_seconds:.1f} s")
    finally:
        if sock is not None:
            sock.close()
        listener.close()
    _check_outcome(report, listener, store_dir, sentinel_tmp)
    return report


def _check_outcome(
    report: Report, listener: ListenerProcess, store_dir: Path, sentinel_tmp: Path
) -> None:
    if report.peak_rss_mb >= MEMORY_LIMIT_MB:
        report.problems.append(f"listener peak RSS {report.peak_rss_mb:.0f} MiB")
    leaked = sorted(str(p) for p in sentinel_tmp.rglob("*"))
    if leaked:
        report.problems.append(f"files outside the store: {leaked[:5]}")
    # replaced/: an instance superseded by new content under its SOPInstanceUID, kept aside.
    allowed_top = {
        "instances", "sr", "tmp", "replaced", "node.sqlite", "node.sqlite-wal", "node.sqlite-shm",
    }  # fmt: skip
    extra = sorted(p.name for p in store_dir.iterdir() if p.name not in allowed_top)
    if extra:
        report.problems.append(f"unexpected entries in the store: {extra}")
    leftovers = sorted(p.name for p in (store_dir / "tmp").iterdir())
    if leftovers:
        report.problems.append(f"temporary files left: {leftovers[:5]}")
    for path in (store_dir / "instances").rglob("*"):
        parts = path.relative_to(store_dir / "instances").parts
        names = [*parts[:-1], parts[-1].removesuffix(".dcm")] if path.is_file() else list(parts)
        if not all(UID_RE.match(n) and len(n) <= 64 for n in names):
            report.problems.append(f"a path not made of UIDs: {path}")
    for path in (store_dir / "replaced").rglob("*"):  # <uid>/<uid>/<uid>.<ns>.dcm
        parts = path.relative_to(store_dir / "replaced").parts
        last = parts[-1].removesuffix(".dcm").rsplit(".", 1)[0] if path.is_file() else parts[-1]
        if not all(UID_RE.match(n) and len(n) <= 64 for n in [*parts[:-1], last]):
            report.problems.append(f"a path not made of UIDs: {path}")
    on_record = _stored_in_database(store_dir)
    for sop in sorted(report.stored):
        path = on_record.get(sop)
        if path is None:
            report.problems.append(f"answered 0x0000 but not in the database: {sop}")
        elif not path.is_file():
            report.problems.append(f"answered 0x0000 but not on disk: {sop}")
    log = listener.text()
    if "Traceback" in log:
        report.problems.append("a traceback in the listener log")
    if report.statuses.get("0x0110"):
        report.problems.append(f"{report.statuses['0x0110']} unexpected handler failures (0x0110)")
    for marker in ("FUZZ^PATIENT", "FUZZ-0001", "X^Y"):
        if marker in log:
            report.problems.append(f"patient data {marker!r} in the listener log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds")
    parser.add_argument("--work", type=Path, default=None, help="folder (default: a temp one)")
    args = parser.parse_args(argv)
    if args.work is None:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="ctcovid-fuzz-"))
    report = run_campaign(
        args.work, count=args.count, seed=args.seed, time_limit_s=args.time_limit
    )
    print(json.dumps({"seed": args.seed, "work": str(args.work), **report.summary()}, indent=2))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
