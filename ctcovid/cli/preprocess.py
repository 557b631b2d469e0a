"""``ctcovid preprocess SERIES_DIR --out FILE.npz``: the model's input slices of one series."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctcovid.cli.common import handle_errors, print_json, setup_logging, stdout


def keep_freed_memory() -> None:
    """Ask glibc's allocator to keep freed memory for reuse in this process.

    Every slice allocates and frees a few arrays of about 1 MB; by default glibc maps such
    blocks afresh and returns them on free, and each new mapping costs a page fault per 4 KiB:
    for a 300-slice 512x512 series about 240 000 faults and a third of the command's CPU time,
    measured here (32 000 with these settings). A no-op where the C library has no ``mallopt``.
    """
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):  # not glibc: its own allocator decides
        pass


@handle_errors
def preprocess(
    series_dir: Annotated[Path, typer.Argument(exists=True, help="Folder of one CT series.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npz file.")],
    center: Annotated[float, typer.Option(help="Window center (HU).")] = -600.0,
    width: Annotated[float, typer.Option(help="Window width (HU).")] = 1500.0,
    size: Annotated[int, typer.Option(help="Output slice size (pixels).")] = 256,
    stack_rule: Annotated[
        str,
        typer.Option(
            help="How one stack (reconstruction) of the series is chosen: criteria in order, "
            "from original, thinnest, thickest, most."
        ),
    ] = "original,thinnest,most",
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Write lung-windowed uint8 slices, z positions and SOP Instance UIDs in slice order.

    The .npz holds `slices` (N,S,S) uint8, `z_mm` (N,) and `sop_instance_uids` (N,). Any CT
    series is converted, even a short one.

    Examples:

      ctcovid preprocess study/ct --out ct.npz
    """
    import numpy as np

    from ctcovid.config import IngestConfig
    from ctcovid.preprocess import preprocess_folder

    setup_logging(verbose)
    keep_freed_memory()
    config = IngestConfig(
        window_center_hu=center, window_width_hu=width, image_size=size, stack_rule=stack_rule
    )
    s, pp = preprocess_folder(series_dir, config, for_classification=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        slices=pp.slices,
        z_mm=pp.z_mm,
        sop_instance_uids=np.array(pp.sop_instance_uids),
        frame_numbers=np.array(pp.frame_numbers, dtype=np.int32),
    )
    summary = {
        "out": str(out),
        "series_instance_uid": s.series_instance_uid,
        "n_slices": len(pp),
        "ordering": s.ordering,
        "stack": s.stack.to_dict() if s.stack is not None else None,
        "n_slices_total": s.n_slices_total,
        "warnings": pp.warnings,
    }
    if json_out:
        print_json(summary)
    else:
        stdout.print(
            f"{out}: {len(pp)} slices of series {s.series_instance_uid} (ordered by {s.ordering})",
            highlight=False,
        )
        for w in pp.warnings:
            stdout.print(f"warning: {w}", highlight=False)
