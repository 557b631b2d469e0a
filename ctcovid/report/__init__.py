"""The result as DICOM for PACS: a TID 1500 Structured Report and heatmap Secondary Captures.

``build_sr`` turns a ``ScanResult`` and its source ``Series`` into a validated Comprehensive 3D
SR (IHE AI Results); ``write_sr`` stores it; ``sr_summary`` reads one back into plain values.
"""

from ctcovid.report.header import (
    HEATMAP_SERIES_NUMBER,
    SR_SERIES_NUMBER,
    heatmap_series_number,
    sr_series_number,
)
from ctcovid.report.heatmap import (
    build_heatmap_secondary_captures,
    overlay_rgb,
    png_bytes,
    write_png,
)
from ctcovid.report.sr import build_sr, revise_sr, write_sr
from ctcovid.report.uids import (
    derive_uid,
    heatmap_uids,
    result_fingerprint,
    sr_uids,
    tracking_uid,
)
from ctcovid.report.validate import sr_summary, validate_sr

__all__ = [
    "HEATMAP_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "build_heatmap_secondary_captures",
    "build_sr",
    "derive_uid",
    "heatmap_series_number",
    "heatmap_uids",
    "overlay_rgb",
    "png_bytes",
    "result_fingerprint",
    "revise_sr",
    "sr_series_number",
    "sr_summary",
    "sr_uids",
    "tracking_uid",
    "validate_sr",
    "write_png",
    "write_sr",
]
