"""Benchmark of ``ctcovid batch`` from a PACS: the same studies from a folder, DIMSE, DICOMweb.

Starts Orthanc (with its DICOMweb plugin when installed) on loopback ports, fills it through its
REST API, and runs the same studies three ways with the same loaded model. Prints one JSON
object: per source the wall seconds, series/s and slices/s of the whole run, and for the PACS
sources the retrieval rate (series/s and MB/s while retrieving) and the wall-time ratio against
the folder run (1.0: retrieval entirely hidden behind classification). Usage::

    python bench/pacs_bench.py --studies 6 --slices 32 --input-size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AET = "CTCOVIDB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6, help="series in the archive")
    parser.add_argument("--slices", type=int, default=32, help="slices per series")
    parser.add_argument("--image-size", type=int, default=256, help="DICOM rows/columns")
    parser.add_argument("--input-size", type=int, default=64, help="model input size (px)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--max-retrievals", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' Orthanc launcher

    import keras
    from node_helpers import Orthanc, free_port

    import dicom_fixtures
    from ctcovid.batch import BatchOptions, run_batch
    from ctcovid.batch.sources import PacsSource
    from ctcovid.config import IngestConfig, ModelConfig
    from ctcovid.inference import Classifier
    from ctcovid.model.artifact import ModelArtifact, save_model
    from ctcovid.model.build import build_res_dense
    from ctcovid.net import SeriesRules, StudyQuery
    from ctcovid.net.dimse import DimseArchive
    from ctcovid.node.config import Peer

    work = Path(tempfile.mkdtemp(prefix="pacs-bench-"))
    archive, model_dir = work / "archive", work / "model"
    dicom_fixtures.generate_studies(archive, args.studies, seed=1, n_slices=args.slices,
                                    size=args.image_size)
    (archive / "manifest.json").unlink()
    keras.utils.set_random_seed(0)
    config = ModelConfig(input_size=args.input_size)
    save_model(
        build_res_dense(config),
        ModelArtifact(model_config=config, ingest_config=IngestConfig(image_size=args.input_size)),
        model_dir,
    )
    classifier = Classifier.from_file(model_dir)
    dicomweb = DICOMWEB_PLUGIN.exists()
    extra: dict[str, Any] = {
        "DicomModalities": {"bench": {"AET": AET, "Host": "127.0.0.1", "Port": free_port(),
                                      "AllowFind": True, "AllowGet": True}},
    }
    if dicomweb:
        extra |= {"Plugins": [str(DICOMWEB_PLUGIN)],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (work / "orthanc").mkdir()
    orthanc = Orthanc(work / "orthanc", free_port(), extra_config=extra)
    try:
        files = sorted(p for p in archive.rglob("*") if p.is_file())
        for path in files:
            orthanc.upload(path)
        archive_bytes = sum(p.stat().st_size for p in files)

        def run(name: str, source: PacsSource | None) -> dict[str, Any]:
            out = work / f"run-{name}"
            start = time.perf_counter()
            summary = run_batch(
                BatchOptions(archive if source is None else out / "cache", out, model_dir,
                             workers=args.workers, source=source),
                classifier=classifier,
            )
            wall = time.perf_counter() - start
            n = summary["counts"]["classified"]
            result: dict[str, Any] = {
                "wall_seconds": round(wall, 3),
                "series_per_second": round(n / wall, 3),
                "slices_per_second": round(summary["this_run"]["slices_classified"] / wall, 2),
                "classified": n,
            }
            if source is not None:
                info = summary["source"]
                seconds = info["retrieve_seconds"] or float("nan")
                result |= {
                    "retrieved_series": info["retrieved_series"],
                    "retrieve_series_per_second": round(info["retrieved_series"] / seconds, 2),
                    "retrieve_mb_per_second": info["retrieve_mb_per_second"],
                    "cache_peak_bytes": info["cache_peak_bytes"],
                }
                source.close()
            return result

        def source_of(archive_: Any) -> PacsSource:
            return PacsSource(archive_, StudyQuery(), SeriesRules(), cache_bytes=10**10,
                              max_retrievals=args.max_retrievals, pause_seconds=0.0)

        run("warm-up", None)  # compile and warm the model outside the timings
        results = {"folder": run("folder", None)}
        results["dimse_c_get"] = run("dimse", source_of(DimseArchive(
            Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet), calling_ae_title=AET)))
        if dicomweb:
            from ctcovid.net.dicomweb import DicomWebArchive

            results["dicomweb"] = run("dicomweb", source_of(DicomWebArchive(
                f"http://127.0.0.1:{orthanc.http_port}/dicom-web")))
        for name, item in results.items():
            if name != "folder":
                item["wall_ratio_vs_folder"] = round(
                    item["wall_seconds"] / results["folder"]["wall_seconds"], 3)
    finally:
        orthanc.close()
    result = {
        "benchmark": "pacs",
        "series": args.studies,
        "slices_per_series": args.slices,
        "dicom_image_size": args.image_size,
        "model_input_size": args.input_size,
        "archive_mb": round(archive_bytes / 1e6, 2),
        "workers": args.workers,
        "max_retrievals": args.max_retrievals,
        "cpu_count": os.cpu_count(),
        "sources": results,
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
