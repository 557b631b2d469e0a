"""Benchmark of the DICOM node (not a test); prints one JSON object.

1. Receive rate: dcmtk ``storescu`` sends a study (default 300 instances, 512x512) to
   ``ctcovid listen`` and, on the same loopback, to dcmtk's own ``storescp``; each gets fresh
   copies (new UIDs) so that every run stores new instances. Both receivers use the same
   maximum PDU (131072 bytes, storescp's largest; its default of 16384 is also measured).
   Reported as instances/s and as the ratio node / storescp (goal: at least 0.8). The node
   fsyncs every instance before answering; storescp does not.
2. Latency: from the last instance acknowledged to the SR arriving at a ``storescp`` peer,
   which includes ``--stable-seconds`` of quiet and the classification.
3. Stream (series per hour with the model loaded): ``--stream-series`` series of
   ``--stream-slices`` uncompressed slices (``--stream-pixels`` square) sent back to back by
   ``storescu``, one association per series (each its own study, as from a modality), to
   ``ctcovid listen --runtime auto`` with the exported model of ``bench/run.py`` (fp32 ONNX,
   int8 on ONNX Runtime and OpenVINO, and bf16 where the CPU has BF16;
   ``--stream-input-size``); timed from the first send to the last SR accepted by a ``storescp``
   peer. ``--stream-stable-seconds`` is kept small (1)
   so that the stream measures the worker, not the quiet time. Reported: series per hour,
   seconds per series (median of the worker's ``event=classified ... seconds=``), the runtime
   the node chose (its log), the peak RSS (VmHWM) of each of the node's processes (listener,
   worker, decoder), the CPU and its flags, and where each series' time goes (receive, wait for
   stable, queued behind earlier series, decode, model, key-slice heatmaps, SR/card/recording,
   delivery), from the job database's state history and the worker's ``event=classified``
   line.

Usage::

    python bench/node_bench.py [--measure rate,latency,stream] [--instances 300] [--size 512]
                               [--repeats 3] [--model MODEL_DIR] [--stable-seconds 2]
                               [--stream-series 20] [--stream-slices 300] [--stream-pixels 512]
                               [--stream-input-size 256] [--stream-runtime auto]
                               [--work bench/work/node]

Without ``--model`` an untrained 32-px model is built once for rate and latency (plumbing speed
only); the stream always uses the exported model (cached under ``BENCH_DATA``). Stream settings
default to ``BENCH_*`` variables (``bench/run.py``'s ``SETTINGS``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def bench_setting(name: str) -> str:
    """A ``BENCH_*`` setting as ``bench/run.py`` defines it (its default unless set)."""
    from bench.run import setting

    return setting(name)


def measure_rate(args: argparse.Namespace, work: Path, model: Path,
                 files: list[Path]) -> dict[str, Any]:
    """Receive rate, alternating receivers so that machine noise hits both alike."""
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
    node_rate = args.instances / statistics.median(node_seconds)
    scp_rate = args.instances / statistics.median(scp_seconds)
    return {
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
    }


def measure_latency(args: argparse.Namespace, work: Path, model: Path,
                    files: list[Path]) -> dict[str, Any]:
    """Last instance acknowledged -> SR delivered to a storescp peer."""
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
    return {"last_instance_to_sr_seconds": round(latency, 2),
            "stable_seconds": args.stable_seconds}


# -- 3. stream ----------------------------------------------------------------------------------


def process_tree(root: int) -> dict[int, int]:
    """``{pid: parent pid}`` of ``root`` and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # the command name (2nd field) may hold spaces: the fields after its ')' are fixed
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree = {root: parents.get(root, 0)}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree[pid] = ppid
                grew = True
    return tree


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (``VmHWM``) of a live process, KiB; None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Samples the VmHWM of a process tree until stopped: a process's high-water mark must be
    read before it exits, so the node's tree is read every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root = root
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self.parents: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        for pid, ppid in process_tree(self.root).items():
            kib = vm_hwm_kib(pid)
            if kib is not None:
                self.peaks[pid] = max(kib, self.peaks.get(pid, 0))
                self.parents[pid] = ppid

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()

    def by_role(self, worker_pid: int | None) -> dict[str, Any]:
        """MiB per role: ``listener`` (the root), ``worker``, ``decoder`` (the worker's
        descendants), ``other`` (e.g. multiprocessing's resource tracker)."""

        def role(pid: int) -> str:
            if pid == self.root:
                return "listener"
            if pid == worker_pid:
                return "worker"
            seen = set()
            while pid in self.parents and pid not in seen:
                seen.add(pid)
                pid = self.parents[pid]
                if pid == worker_pid:
                    return "decoder"
            return "other"

        out: dict[str, Any] = {}
        for pid, kib in sorted(self.peaks.items()):
            name = role(pid)
            out[name] = max(out.get(name, 0.0), round(kib / 1024, 1))
        return out


def log_fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def stream_profile(db_file: Path, log_text: str, sends: dict[str, tuple[float, float]]
                   ) -> list[dict[str, Any]]:
    """Per series, seconds in each stage, from the job history and the worker's log line.

    ``sends``: series UID -> (storescu start, end), ``time.time()`` like the database."""
    classified = {
        f["series"]: f for f in map(log_fields, log_text.splitlines())
        if f.get("event") == "classified"
    }
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT s.series_instance_uid, s.first_received, s.last_received, h.state, h.at "
            "FROM series s JOIN history h USING (study_instance_uid, series_instance_uid) "
            "ORDER BY h.at, h.rowid"
        ).fetchall()
    finally:
        db.close()
    at: dict[str, dict[str, float]] = {}
    received: dict[str, tuple[float, float]] = {}
    for uid, first, last, state, when in rows:
        at.setdefault(uid, {}).setdefault(state, when)  # the first time in each state
        received[uid] = (first, last)
    profile = []
    for uid, (sent_start, sent_end) in sorted(sends.items(), key=lambda kv: kv[1]):
        states, fields = at.get(uid, {}), classified.get(uid, {})
        first, last = received.get(uid, (float("nan"), float("nan")))
        row: dict[str, Any] = {
            "storescu_seconds": sent_end - sent_start,
            "received_seconds": last - first,  # first to last instance stored by the node
            # last instance -> queued: the quiet time (stable_seconds, checked every
            # poll_seconds), longer while the worker is busy (it queues between series)
            "until_queued_seconds": states.get("waiting", float("nan")) - last,
            # queued -> the worker takes it: the series before it in the stream
            "queued_seconds": states.get("classifying", float("nan"))
            - states.get("waiting", float("nan")),
        }
        if fields:
            total = float(fields["seconds"])
            decode = float(fields["decode_seconds"]) if fields["decode_seconds"] != "-" else 0.0
            model = float(fields["model_seconds"])
            heatmap = float(fields["heatmap_seconds"])
            row.update(classify_seconds=total, decode_seconds=decode, model_seconds=model,
                       heatmap_seconds=heatmap,
                       sr_card_record_seconds=total - decode - model - heatmap,
                       slices=int(fields["slices"]))
        row["delivery_seconds"] = states.get("sent", float("nan")) - states.get(
            "classified", float("nan"))
        row["sent_at"] = states.get("sent")
        profile.append(row)
    return profile


def measure_stream(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import pydicom

    from bench.run import exported_model, machine_description
    from ctcovid.model.runtimes import cpu_description

    model, _, report = exported_model(args.stream_input_size)
    files = make_study(work, args.stream_slices, args.stream_pixels)
    n = args.stream_series
    copies = [fresh_copy(files, work / "stream-copies" / f"series_{i:03d}", f"stream-{i}")
              for i in range(n)]
    series_uids = [
        str(pydicom.dcmread(c[0], stop_before_pixels=True).SeriesInstanceUID) for c in copies
    ]
    peer_port = free_port()
    peer_out = work / "stream-peer-out"
    store = work / "store-stream"
    for folder in (peer_out, store):
        shutil.rmtree(folder, ignore_errors=True)
    peer_out.mkdir()
    log = work / "node-stream.log"
    peer = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(peer_out), str(peer_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = Node(store, model, log, "--stable-seconds", str(args.stream_stable_seconds),
                "--peer", f"127.0.0.1:{peer_port}:PACS", "--runtime", args.stream_runtime)
    memory = PeakMemory(node.proc.pid)
    db_file = store / "node.sqlite"

    def all_sent() -> bool:
        failed = re.search(r"event=(classify_failed|series_unusable).*", log.read_text())
        if failed:
            raise RuntimeError(f"a stream series was not classified ({log}): {failed.group(0)}")
        db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
        try:
            (count,) = db.execute("SELECT count(*) FROM series WHERE state = 'sent'").fetchone()
        finally:
            db.close()
        return bool(count >= n)

    sends: dict[str, tuple[float, float]] = {}
    load_before = os.getloadavg()
    try:
        wait_for(lambda: port_open(peer_port), 30, "storescp")
        first_send = time.time()
        for uid, copy in zip(series_uids, copies, strict=True):
            start = time.time()
            send(node.port, "CTCOVID", copy)
            sends[uid] = (start, time.time())
        last_acked = time.time()
        wait_for(all_sent, args.stream_timeout, f"{n} SRs", 0.2)
    finally:
        memory.stop()
        node.stop()
        peer.terminate()
        peer.wait(timeout=30)
    text = log.read_text()
    profile = stream_profile(db_file, text, sends)
    last_sent = max(row["sent_at"] for row in profile)
    span = last_sent - first_send
    srs = [p for p in peer_out.iterdir() if p.name.startswith("SR")]
    loaded = next((log_fields(line) for line in text.splitlines()
                   if "event=model_loaded" in line), {})
    # the listener checks the model at start and the worker loads it: each logs the choice
    why = list(dict.fromkeys(
        line.split(": ", 1)[-1] for line in text.splitlines()
        if any(words in line for words in ("auto uses", "auto falls back", "as asked"))
    ))
    worker = re.search(r"event=worker_started pid=(\d+)", text)
    median = {
        key: round(statistics.median(row[key] for row in profile), 2)
        for key in profile[0] if key.endswith("_seconds") and all(key in r for r in profile)
    }
    shutil.rmtree(work / "stream-copies", ignore_errors=True)  # several GB at full size
    shutil.rmtree(store / "instances", ignore_errors=True)  # the received series
    return {
        "series": n,
        "slices_per_series": args.stream_slices,
        "pixels": args.stream_pixels,
        "transfer_syntax": "explicit VR little endian (uncompressed)",
        "model": str(model),
        "input_size": args.stream_input_size,
        "graphs": sorted(report.get("graphs", {})),
        "runtime_requested": args.stream_runtime,
        "runtime_chosen": loaded.get("runtime"),
        "runtime_why": why,
        "stable_seconds": args.stream_stable_seconds,
        "stable_seconds_note": "kept small so that the stream measures the worker",
        "srs_at_peer": len(srs),
        "first_send_to_last_sr_seconds": round(span, 1),
        "sending_seconds": round(last_acked - first_send, 1),
        "series_per_hour": round(n / span * 3600, 1),
        "series_per_hour_goal": 1000,
        "seconds_per_series": median.get("classify_seconds"),
        "seconds_per_series_goal": 3.6,
        "profile_median_seconds": median,
        # the first series meets an idle worker (and starts its decoder process): its profile
        # is one series' own path; the later ones queue behind it
        "profile_per_series": [
            {k: round(v, 2) for k, v in row.items() if k != "sent_at"} for row in profile
        ],
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]},
        "peak_rss_mib": memory.by_role(int(worker.group(1)) if worker else None),
        "cpu": cpu_description(),
        "machine": machine_description(),
        "log": str(log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", default="rate,latency,stream",
                        help="comma-separated, from rate, latency, stream")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--stream-series", type=int,
                        default=int(bench_setting("BENCH_NODE_STREAM_SERIES")))
    parser.add_argument("--stream-slices", type=int,
                        default=int(bench_setting("BENCH_NODE_STREAM_SLICES")))
    parser.add_argument("--stream-pixels", type=int, default=int(bench_setting("BENCH_PIXELS")))
    parser.add_argument("--stream-input-size", type=int,
                        default=int(bench_setting("BENCH_INPUT_SIZE")))
    parser.add_argument("--stream-runtime", default=bench_setting("BENCH_NODE_STREAM_RUNTIME"))
    parser.add_argument("--stream-stable-seconds", type=float, default=1.0)
    parser.add_argument("--stream-timeout", type=float,
                        default=float(bench_setting("BENCH_NODE_STREAM_TIMEOUT_S")))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "node")
    args = parser.parse_args()
    measures = args.measure.split(",")
    unknown = set(measures) - {"rate", "latency", "stream"}
    if unknown:
        sys.exit(f"--measure: unknown {', '.join(sorted(unknown))}")
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install dcmtk")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    if "rate" in measures or "latency" in measures:
        model = args.model or build_tiny_model(work / "tiny-model")
        files = make_study(work, args.instances, args.size)
        out.update(instances=args.instances,
                   instance_bytes=int(statistics.mean(p.stat().st_size for p in files)),
                   repeats=args.repeats, model=str(model))
        if "rate" in measures:
            out.update(measure_rate(args, work, model, files))
        if "latency" in measures:
            out.update(measure_latency(args, work, model, files))
    if "stream" in measures:
        out["stream"] = measure_stream(args, work)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
