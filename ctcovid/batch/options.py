"""What a batch run is asked to do: the archive (a folder, or a PACS source), the output folder,
the model, the engine and its workers, and where the SRs also go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB

if TYPE_CHECKING:
    from ctcovid.batch.sources import PacsSource
    from ctcovid.net.mllp import Hl7Settings
    from ctcovid.net.sender import SendSettings
    from ctcovid.report.deid import PseudonymKey


def default_workers() -> int:
    """Decode workers: every core but the one that runs inference."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class BatchOptions:
    archive: Path
    out: Path
    model_path: Path
    resume: bool = False
    workers: int = field(default_factory=default_workers)
    engine: str = "local"
    batch_size: int = 32
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    # A PACS in place of the archive folder (``sources.py``); ``archive`` is then its cache.
    source: PacsSource | None = None
    # Where every SR also goes, by C-STORE or STOW-RS, and to a RIS as ORU (``destinations.py``).
    destinations: tuple[SendSettings | Hl7Settings, ...] = ()
    # Address-space limit of each decoder process, MiB (0: none).
    decoder_memory_mb: int = DEFAULT_DECODER_MEMORY_MB
    runtime: str = "auto"  # how the model runs (ctcovid.model.runtimes.RUNTIMES), not where
    # The audit trail (ctcovid.batch.auditing): a file, and/or a syslog repository over TLS.
    audit_file: Path | None = None
    audit_syslog: str | None = None  # HOST:PORT
    audit_ca: Path | None = None
    # With a key, the run also writes its pseudonymised research export to out/research
    # (``research.py``).
    research_key: PseudonymKey | None = None
    # A result card (ctcovid.report.card) beside each SR in out/cards, sent with it.
    result_card: bool = False
