"""Helpers for the DICOM node tests: free ports, bounded waits, peers started as processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

NODE_AET = "CTCOVID"
# Loopback only: never route the tests' REST calls through a proxy from the environment.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PACS_AET = "PACS"
# Worker start = TensorFlow import + model build; on a busy 2-core machine that can take a minute.
WORKER_READY_SECONDS = 240.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package: dcmtk / orthanc)")
    return path


def storescu(
    port: int, files: list[Path], *, calling: str = "STORESCU", called: str = NODE_AET,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    require_tool("storescu")
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=180, check=False,
    )


def echoscu(port: int, *, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    require_tool("echoscu")
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", NODE_AET, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60, check=False,
    )


class NodeProcess:
    """``ctcovid listen`` as a child process, its stderr in a log file."""

    def __init__(self, store: Path, model: Path, log: Path, *args: str) -> None:
        self.log = log
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        self._log_fh = open(log, "ab")  # noqa: SIM115 - open for the life of the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctcovid.cli.main", "listen", "--store", str(store),
             "--model", str(model), "--host", "127.0.0.1", "--ae-title", NODE_AET, *args],
            stdout=self._log_fh, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group, as under a service manager
        )
        match = wait_for(self._listening, 120, "the node to listen")
        self.port = int(match.group(1))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def _listening(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            pytest.fail(f"the node exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
        matches = list(re.finditer(r"event=listening .*?port=(\d+)", self.text()))
        return matches[-1] if matches else None

    def wait_worker_ready(self, count: int = 1) -> None:
        wait_for(lambda: self.text().count("event=worker_ready") >= count,
                 WORKER_READY_SECONDS, "the worker to load the model", interval=1.0)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 180) -> int:
        """SIGTERM to the whole process group (listener and worker), as systemd or timeout do."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log_fh.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log_fh.close()


@contextlib.contextmanager
def storescp(out_dir: Path, port: int, *, aet: str = PACS_AET) -> Iterator[subprocess.Popen]:
    """dcmtk's storescp as PACS, writing what it receives to ``out_dir`` (lifetime bounded)."""
    require_tool("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["timeout", "900", "storescp", "-aet", aet, "-od", str(out_dir), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _port_open(port), 30, "storescp to listen")
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Orthanc:
    """Orthanc started with a generated configuration on free loopback ports."""

    def __init__(
        self, work: Path, node_port: int, *, dicom_port: int | None = None, aet: str = "ORTHANC",
        extra_config: dict[str, Any] | None = None, basic_auth: tuple[str, str] | None = None,
    ) -> None:
        binary = require_tool("Orthanc")
        self.aet = aet
        self.dicomweb_url = ""
        self.http_port, self.dicom_port = free_port(), dicom_port or free_port()
        storage = work / "orthanc-db"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ctcovid-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [],
            "DicomModalities": {"ctcovid": [NODE_AET, "127.0.0.1", node_port]},
        }
        config.update(extra_config or {})
        self.basic_auth = basic_auth
        if basic_auth is not None:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = {basic_auth[0]: basic_auth[1]}
        config_path = work / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        self._log = open(work / "orthanc.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            ["timeout", "900", binary, str(config_path)], stdout=self._log, stderr=self._log
        )
        wait_for(self._alive, 60, "Orthanc's REST API")

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"Orthanc exited with {self.proc.returncode}")
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        if self.basic_auth is not None:
            import base64

            token = base64.b64encode(":".join(self.basic_auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with LOOPBACK.open(req, timeout=120) as resp:
            return json.loads(resp.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> dict[str, Any]:
        return self.request("POST", "/instances", path.read_bytes())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_with_dicomweb(
    work: Path, *, basic_auth: tuple[str, str] | None = None, **extra: Any
) -> Orthanc:
    """Orthanc with its DICOMweb plugin at ``/dicom-web/`` (skips without Debian's
    ``orthanc-dicomweb``); ``dicomweb_url`` is set on it."""
    require_tool("Orthanc")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian: orthanc-dicomweb)")
    config = {
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **extra,
    }
    orthanc = Orthanc(work, free_port(), basic_auth=basic_auth, extra_config=config)
    orthanc.dicomweb_url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    return orthanc


def study_of_instance_in_orthanc(orthanc: Orthanc, sop_instance_uid: str) -> str | None:
    """The StudyInstanceUID under which Orthanc holds ``sop_instance_uid``, or None."""
    found = orthanc.request("POST", "/tools/lookup", sop_instance_uid.encode())
    if not found:
        return None
    return str(orthanc.get(f"/instances/{found[0]['ID']}/simplified-tags")["StudyInstanceUID"])


def make_test_ca(folder: Path) -> dict[str, Path]:
    """A CA and one certificate for 127.0.0.1/localhost signed by it, made with openssl."""
    require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
    key, csr, cert = folder / "node.key", folder / "node.csr", folder / "node.pem"
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca_cert), "-days", "2", "-subj", "/CN=ctcovid test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj",
        "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return {"ca": ca_cert, "cert": cert, "key": key}


# -- the listener alone as a process, its memory, raw PDUs ----------------------------------

LISTENER_SCRIPT = Path(__file__).with_name("listener_process.py")


def proc_status_mb(pid: int, field: str) -> float:
    """A memory line of /proc/PID/status (VmHWM: peak resident set, VmRSS: now) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class ListenerProcess:
    """The node's listener alone in a child process (no worker, no model); see its script."""

    def __init__(
        self, store: Path, log: Path, *, extra_env: dict[str, str] | None = None, **settings: Any
    ) -> None:
        self.store = store
        self.log = log
        config = {"store": str(store), "host": "127.0.0.1", "port": 0, "ae_title": NODE_AET,
                  "min_free_mb": 0, **settings}
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._log_fh = open(log, "ab")  # noqa: SIM115 - open for the life of the process
        self.proc = subprocess.Popen(
            [sys.executable, str(LISTENER_SCRIPT), json.dumps(config)],
            stdout=self._log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        match = wait_for(self._listening, 60, "the listener to listen", interval=0.1)
        self.port = int(match.group(1))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def _listening(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            pytest.fail(f"the listener exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
        return re.search(r"event=listening .*?port=(\d+)", self.text())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def peak_rss_mb(self) -> float:
        return proc_status_mb(self.proc.pid, "VmHWM")

    def rss_mb(self) -> float:
        return proc_status_mb(self.proc.pid, "VmRSS")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log_fh.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log_fh.close()


def associate_rq_pdu(
    *, calling: str = "RAWSCU", called: str = NODE_AET,
    contexts: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),
    ),
    max_pdu: int = 16384,
) -> bytes:
    """An encoded A-ASSOCIATE-RQ PDU, to speak to the listener over a raw socket."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    presentation = []
    for index, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = 2 * index + 1
        presentation.append(cx)
    primitive.presentation_context_definition_list = presentation
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def raw_associate(port: int, *, host: str = "127.0.0.1", **kwargs: Any) -> socket.socket:
    """A raw TCP socket with an accepted association (the A-ASSOCIATE-AC read and checked)."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(associate_rq_pdu(**kwargs))
    header = recv_exactly(sock, 6)
    assert header[0] == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{header[0]:02X}"
    recv_exactly(sock, int.from_bytes(header[2:6], "big"))
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the other end closes (or resets) the connection within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def _command_element(tag: int, value: bytes | int) -> bytes:
    """One Implicit VR Little Endian element of a command set (US as int, UI as bytes)."""
    if isinstance(value, int):
        raw = value.to_bytes(2 if tag != 0x00000000 else 4, "little")
    else:
        raw = value + (b"\0" if len(value) % 2 else b"")
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw


def command_set(command_field: int, message_id: int, sop_class: str,
                sop_instance: str | None, has_dataset: bool) -> bytes:
    """An encoded DIMSE request command set (PS3.7 E.1), whatever its UIDs look like."""
    body = _command_element(0x00000002, sop_class.encode("latin-1"))
    body += _command_element(0x00000100, command_field)
    body += _command_element(0x00000110, message_id)
    if command_field == 0x0001:
        body += _command_element(0x00000700, 0)  # priority
    body += _command_element(0x00000800, 0x0000 if has_dataset else 0x0101)
    if sop_instance is not None:
        body += _command_element(0x00001000, sop_instance.encode("latin-1"))
    return _command_element(0x00000000, len(body)) + body


def p_data_pdus(
    command: bytes, dataset: bytes | None, context_id: int, max_pdu: int
) -> list[bytes]:
    """Command and data set fragmented into P-DATA-TF PDUs of at most ``max_pdu`` bytes."""
    room = max_pdu - 6  # PDV item: length (4), context ID (1), control header (1)
    pdus = []
    for payload, is_command in ((command, True), (dataset, False)):
        if payload is None:
            continue
        chunks = [payload[i:i + room] for i in range(0, len(payload), room)] or [b""]
        for index, chunk in enumerate(chunks):
            control = (1 if is_command else 0) | (2 if index == len(chunks) - 1 else 0)
            item = (len(chunk) + 2).to_bytes(4, "big") + bytes([context_id, control]) + chunk
            pdus.append(b"\x04\x00" + len(item).to_bytes(4, "big") + item)
    return pdus


def c_store_pdus(
    dataset: bytes, *, sop_class: str, sop_instance: str, context_id: int = 1,
    max_pdu: int = 16384, message_id: int = 1,
) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ carrying ``dataset`` (encoded, no file meta) as is.

    Lets a test send exactly the bytes it wants, malformed or not (UIDs included), and stop
    wherever it likes.
    """
    command = command_set(0x0001, message_id, sop_class, sop_instance, has_dataset=True)
    return p_data_pdus(command, dataset, context_id, max_pdu)


def c_echo_pdus(context_id: int, message_id: int = 1) -> list[bytes]:
    command = command_set(0x0030, message_id, "1.2.840.10008.1.1", None, has_dataset=False)
    return p_data_pdus(command, None, context_id, 16384)


def read_dimse_status(sock: socket.socket) -> int:
    """Read P-DATA-TF PDUs up to the end of a response's command set; its Status."""
    from io import BytesIO

    from pynetdicom.dsutils import decode

    command = b""
    while True:
        header = recv_exactly(sock, 6)
        if header[0] != 0x04:
            raise ConnectionError(f"expected P-DATA-TF, got PDU type 0x{header[0]:02X}")
        body = recv_exactly(sock, int.from_bytes(header[2:6], "big"))
        offset, last = 0, False
        while offset < len(body):
            length = int.from_bytes(body[offset:offset + 4], "big")
            control, value = body[offset + 5], body[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 1:
                command += value
                last = bool(control & 2)
        if last:
            return int(decode(BytesIO(command), True, True).Status)


def raw_c_store(sock: socket.socket, dataset: bytes, **kwargs: Any) -> int:
    """C-STORE over an association opened by :func:`raw_associate`; the response status."""
    for pdu in c_store_pdus(dataset, **kwargs):
        sock.sendall(pdu)
    return read_dimse_status(sock)


def release(sock: socket.socket) -> None:
    """A-RELEASE-RQ, wait for the reply (bounded), close."""
    with contextlib.suppress(OSError):
        sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        sock.settimeout(5)
        sock.recv(64)
    sock.close()


def _exits_cleanly(heartbeat: Any) -> None:
    """A worker process that obeys a stop at once (SIGTERM to the group)."""


def clean_exit_supervisor(
    monkeypatch: pytest.MonkeyPatch, on_lost: Callable[[], object]
) -> tuple[Any, Any]:
    """A worker supervisor whose worker exits cleanly as soon as it starts, as one does when the
    node's SIGTERM reaches the process group, and the node's stop flag (a threading.Event) it
    reads; the supervisor waits 0.5 s for that flag after a clean exit."""
    import multiprocessing
    import threading

    from ctcovid.node import service

    monkeypatch.setattr(service, "STOP_GRACE_SECONDS", 0.5)
    mp = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start(heartbeat: Any) -> Any:
        process = mp.Process(target=_exits_cleanly, args=(heartbeat,), daemon=True)
        process.start()
        process.join(60)  # it has exited before the node's own stop shows
        return process

    supervisor = service.WorkerSupervisor(
        start, lambda: mp.Value("d", 0.0, lock=False), stall_seconds=60,
        on_lost=on_lost, stopping=stopping.is_set,
    )
    return supervisor, stopping


def variant_series(source: Path, out: Path, series_number: int, **values: Any) -> Path:
    """A copy of a fixture series as a new series (UIDs derived from ``source`` and
    ``series_number``) with some header attributes set to ``values``."""
    import pydicom

    uid = pydicom.uid.generate_uid(entropy_srcs=[str(source), str(series_number)])
    out.mkdir(parents=True)
    for path in sorted(p for p in source.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.SeriesNumber = series_number
        ds.SOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=[str(ds.SOPInstanceUID), str(series_number)]
        )
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(out / path.name, enforce_file_format=True)
    return out


def put(store: Any, path: Path, *, calling_aet: str = "") -> bool:
    """Store the DICOM file ``path`` in a node ``Store`` as the listener would; True if new."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return bool(
        store.put_instance(
            path.read_bytes(),
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            calling_aet=calling_aet,
        )
    )


def ct_files(studies_root: Path, study: str) -> list[Path]:
    """The CT files of a fixture study (some studies use names without an extension)."""
    return sorted(p for p in (studies_root / study / "ct").iterdir() if p.is_file())


def run_until_idle(worker: Any, max_steps: int = 10) -> None:
    """Step a node ``Worker`` until it has no work left (at most ``max_steps`` steps)."""
    for _ in range(max_steps):
        if not worker.step():
            return
    pytest.fail(f"the worker still had work after {max_steps} steps")
