"""Benchmark of the DICOM node (not a test); prints one JSON object.

1. Receive rate: dcmtk ``storescu`` sends a study (default 300 instances, 512x512) to
   ``ctcovid listen`` and, on the same loopback, to dcmtk's own ``storescp``; each gets fresh
   copies (new UIDs) so that every run stores new instances. Both receivers use the same
   maximum PDU (131072 bytes, storescp's largest; its default of 16384 is also measured).
   Reported as instances/s and as the ratio node / storescp (goal: at least 0.8). The node
   fsyncs every instance before answering; storescp does not.
2. Latency: from the last instance acknowledged to the SR arriving at a ``storescp`` peer,
   which includes ``--stable-seconds`` of quiet and the classification.

Usage::

    python bench/node_bench.py [--instances 300] [--size 512] [--repeats 3]
                               [--model MODEL_DIR] [--stable-seconds 2] [--work bench/work/node]

Without ``--model`` an untrained 32-px model is built once (plumbing speed only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_PDU_BYTES = 131072


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def make_study(work: Path, n: int, size: int) -> list[Path]:
    import dicom_fixtures

    folder = work / f"study_{n}x{size}"
    if not (folder / "manifest.json").exists():
        dicom_fixtures.generate_studies(folder, 1, seed=11, n_slices=n, size=size)
    return sorted(p for p in (folder / "study_000" / "ct").iterdir() if p.is_file())


def fresh_copy(files: list[Path], out: Path, tag: str) -> list[Path]:
    """The study with new Study/Series/SOP Instance UIDs, so a receiver sees new instances."""
    import pydicom

    from ctcovid.report.uids import derive_uid

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    paths = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = derive_uid("bench-study", tag, ds.StudyInstanceUID)
        ds.SeriesInstanceUID = derive_uid("bench-series", tag, ds.SeriesInstanceUID)
        ds.SOPInstanceUID = derive_uid("bench-sop", tag, ds.SOPInstanceUID)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / f"IM{i:04d}.dcm"
        ds.save_as(target)
        paths.append(target)
    return paths


def send(port: int, called: str, files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        check=True, capture_output=True, timeout=1800,
    )
    return time.perf_counter() - start


def build_tiny_model(path: Path) -> Path:
    if (path / "ctcovid.json").exists():
        return path
    code = (
        "import keras, sys; from pathlib import Path;"
        "from ctcovid.config import IngestConfig, ModelConfig;"
        "from ctcovid.model.artifact import ModelArtifact, save_model;"
        "from ctcovid.model.build import build_res_dense;"
        "keras.utils.set_random_seed(0); c = ModelConfig(input_size=32);"
        "save_model(build_res_dense(c), ModelArtifact(model_config=c,"
        " ingest_config=IngestConfig(image_size=32, min_slices=4)), Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=900)
    return path


class Node:
    def __init__(self, store: Path, model: Path, log: Path, *args: str) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - open for the life of the process
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctcovid.cli.main", "listen", "--store", str(store),
             "--model", str(model), "--host", "127.0.0.1", "--port", "0", "--ae-title",
             "CTCOVID", "--min-free-mb", "0", *args],
            stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        match = wait_for(
            lambda: re.search(r"event=listening .*?port=(\d+)", log.read_text()), 300, "listen"
        )
        self.port = int(match.group(1))
        wait_for(lambda: "event=worker_ready" in log.read_text(), 900, "the worker", 1.0)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._fh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "node")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install dcmtk")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or build_tiny_model(work / "tiny-model")
    files = make_study(work, args.instances, args.size)
    instance_bytes = int(statistics.mean(p.stat().st_size for p in files))

    # 1. receive rate, alternating receivers so that machine noise hits both alike
    node_seconds: list[float] = []
    scp_seconds: list[float] = []
    scp_port = free_port()
    scp_out = work / "storescp-out"
    shutil.rmtree(scp_out, ignore_errors=True)
    scp_out.mkdir()
    shutil.rmtree(work / "store-rate", ignore_errors=True)
    scp_default_seconds: list[float] = []
    default_port = free_port()
    toml = work / "node-rate.toml"
    toml.write_text(f"max_pdu_bytes = {MAX_PDU_BYTES}\n")
    node = Node(work / "store-rate", model, work / "node-rate.log", "--stable-seconds", "1e6",
                "--config", str(toml))
    scps = [
        subprocess.Popen(
            ["storescp", *pdu, "-od", str(scp_out), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for pdu, port in (
            (["--max-pdu", str(MAX_PDU_BYTES)], scp_port), ([], default_port)
        )
    ]
    try:
        wait_for(lambda: port_open(scp_port) and port_open(default_port), 30, "storescp")
        for rep in range(args.repeats):
            copy = fresh_copy(files, work / "copy", f"rate-node-{rep}")
            node_seconds.append(send(node.port, "CTCOVID", copy))
            copy = fresh_copy(files, work / "copy", f"rate-scp-{rep}")
            scp_seconds.append(send(scp_port, "STORESCP", copy))
            copy = fresh_copy(files, work / "copy", f"rate-scp-default-{rep}")
            scp_default_seconds.append(send(default_port, "STORESCP", copy))
    finally:
        node.stop()
        for scp in scps:
            scp.terminate()
            scp.wait(timeout=30)

    # 2. last instance -> SR delivered
    peer_port = free_port()
    peer_out = work / "peer-out"
    shutil.rmtree(peer_out, ignore_errors=True)
    peer_out.mkdir()
    shutil.rmtree(work / "store-latency", ignore_errors=True)
    peer = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(peer_out), str(peer_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = Node(work / "store-latency", model, work / "node-latency.log",
                "--stable-seconds", str(args.stable_seconds),
                "--peer", f"127.0.0.1:{peer_port}:PACS")
    try:
        copy = fresh_copy(files, work / "copy", "latency")
        send(node.port, "CTCOVID", copy)
        acked = time.perf_counter()
        wait_for(lambda: list(peer_out.iterdir()), 3600, "the SR", 0.05)
        latency = time.perf_counter() - acked
    finally:
        node.stop()
        peer.terminate()
        peer.wait(timeout=30)

    node_rate = args.instances / statistics.median(node_seconds)
    scp_rate = args.instances / statistics.median(scp_seconds)
    print(json.dumps({
        "instances": args.instances,
        "instance_bytes": instance_bytes,
        "repeats": args.repeats,
        "node_seconds": [round(s, 3) for s in node_seconds],
        "storescp_seconds": [round(s, 3) for s in scp_seconds],
        "storescp_default_pdu_seconds": [round(s, 3) for s in scp_default_seconds],
        "max_pdu_bytes": MAX_PDU_BYTES,
        "node_instances_per_s": round(node_rate, 1),
        "storescp_instances_per_s": round(scp_rate, 1),
        "storescp_default_pdu_instances_per_s": round(
            args.instances / statistics.median(scp_default_seconds), 1
        ),
        "receive_ratio": round(node_rate / scp_rate, 3),
        "receive_ratio_goal": 0.8,
        "last_instance_to_sr_seconds": round(latency, 2),
        "stable_seconds": args.stable_seconds,
        "model": str(model),
    }, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
