"""DICOM ingest: header scan, series grouping and judging, slice ordering, decoding to HU."""

from ctcovid.dicom.pixels import decode_instance_hu, iter_hu, to_hu
from ctcovid.dicom.scan import ScanReport, read_header, scan_files
from ctcovid.dicom.series import assess, convertible, load_series, scan, select_series
from ctcovid.dicom.syntaxes import DECODABLE_TRANSFER_SYNTAXES
from ctcovid.dicom.types import BadFile, Instance, Series, SliceRef, Stack

__all__ = [
    "DECODABLE_TRANSFER_SYNTAXES",
    "BadFile",
    "Instance",
    "ScanReport",
    "Series",
    "SliceRef",
    "Stack",
    "assess",
    "convertible",
    "decode_instance_hu",
    "iter_hu",
    "load_series",
    "read_header",
    "scan",
    "scan_files",
    "select_series",
    "to_hu",
]
