"""Helpers for the DICOM node tests: free ports, bounded waits, peers started as processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
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
