"""What an instance may be and declare before anything is decoded.

Two kinds of refusal, each naming the attribute:

- :func:`kind_reason`: the image is not a CT slice in Hounsfield units (RescaleType other than
  HU, a projection such as MIP/MinIP, colour). Such images form their own stack, never usable.
- :func:`bounds_reason`: the file declares more than it may or holds (Rows/Columns, NumberOfFrames,
  pixel bytes, an undecodable transfer syntax). Such an instance is dropped for cause.

:func:`check_codestreams` then compares each compressed frame's own dimensions (JPEG SOF,
JPEG-LS SOF55, JPEG 2000 SIZ, RLE segment count) with Rows/Columns before it is decoded, so a
tiny codestream cannot make the decoder allocate gigabytes.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from ctcovid.config import IngestConfig
from ctcovid.dicom.syntaxes import DECODABLE_TRANSFER_SYNTAXES, NATIVE_TRANSFER_SYNTAXES
from ctcovid.dicom.types import Instance
from ctcovid.errors import InvalidInputError

# ImageType / FrameType values of projections and renderings: not slices of the body in HU.
PROJECTION_IMAGE_TYPES = frozenset(
    {
        "MIP",
        "MINIP",
        "MAXIP",
        "MAX_IP",
        "MIN_IP",
        "PROJECTION",
        "PROJECTION IMAGE",
        "VOLUME_RENDER",
        "SURFACE_RENDER",
    }
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

_JPEG_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    }
)
_J2K_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
_RLE = "1.2.840.10008.1.2.5"
# Start-of-frame markers: JPEG SOF0-SOF15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (F7).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD})
_SOF_MARKERS |= {0xCE, 0xCF, 0xF7}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})


def _groups(ds: Dataset, keyword: str) -> list[Dataset]:
    """Items of ``keyword`` in the shared and every per-frame functional group."""
    out: list[Dataset] = []
    for groups_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups_kw) or []:
            out.extend(group.get(keyword) or [])
    return out


def kind_reason(inst: Instance) -> str:
    """Why an instance is not a CT slice in HU (``""`` when it is), naming the attribute."""
    ds = inst.header
    samples = ds.get("SamplesPerPixel")
    if samples not in (None, "") and int(samples) != 1:
        return f"SamplesPerPixel (0028,0002) is {int(samples)}, not 1 (a colour image)"
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric and photometric not in MONOCHROME:
        return f"PhotometricInterpretation (0028,0004) is {photometric}, not MONOCHROME1/2"
    rescale_types = {str(ds.RescaleType).strip().upper()} if ds.get("RescaleType") else set()
    rescale_types |= {
        str(item.RescaleType).strip().upper()
        for item in _groups(ds, "PixelValueTransformationSequence")
        if item.get("RescaleType")
    }
    rescale_types -= {"", "HU"}
    if rescale_types:
        return f"RescaleType (0028,1054) is {', '.join(sorted(rescale_types))}, not HU"
    image_types = set(inst.image_type)
    for item in _groups(ds, "CTImageFrameTypeSequence"):
        frame_type = item.get("FrameType") or ()
        image_types |= {str(v).strip().upper() for v in frame_type}
        technique = str(item.get("VolumeBasedCalculationTechnique", "") or "").strip().upper()
        image_types.add(technique)
    technique = str(ds.get("VolumeBasedCalculationTechnique", "") or "").strip().upper()
    image_types.add(technique)
    projection = sorted(image_types & PROJECTION_IMAGE_TYPES)
    if projection:
        return f"ImageType (0008,0008) is a projection ({', '.join(projection)}), not a slice"
    return ""


def _bytes_per_frame(ds: Dataset, rows: int, cols: int) -> int:
    bits = int(ds.get("BitsAllocated") or 16)
    samples = int(ds.get("SamplesPerPixel") or 1)
    return (rows * cols * samples * bits + 7) // 8


def bounds_reason(inst: Instance, config: IngestConfig) -> str:
    """Why an instance must not be decoded (``""`` when it may), naming the attribute.

    Costs nothing but arithmetic on the header: Rows, Columns and NumberOfFrames are bounded by
    ``config``, and the pixel bytes they declare are compared with what the file holds (from the
    pixel data element's offset and length found by the header scan).
    """
    ds = inst.header
    syntax = inst.transfer_syntax_uid
    # A file meta without a syntax leaves the choice to pydicom (it decodes native data).
    if syntax and syntax not in DECODABLE_TRANSFER_SYNTAXES:
        return f"transfer syntax {syntax} (0002,0010) cannot be decoded here"
    limit = config.max_rows_columns
    for value, name in ((inst.rows, "Rows (0028,0010)"), (inst.columns, "Columns (0028,0011)")):
        if not value or value < 1:
            return f"lacks {name}"
        if value > limit:
            return f"{name} is {value}, above the limit {limit}"
    if inst.number_of_frames > config.max_frames:
        return (
            f"NumberOfFrames (0028,0008) is {inst.number_of_frames}, "
            f"above the limit {config.max_frames}"
        )
    if inst.file_size is None:  # an Instance not made by the header scan: nothing more known
        return ""
    if inst.pixel_data_offset is None:
        return "lacks PixelData (7FE0,0010)"
    assert inst.rows is not None and inst.columns is not None
    available = inst.file_size - inst.pixel_data_offset
    frames = inst.number_of_frames
    if inst.pixel_data_length is None:  # encapsulated: at least one item per frame
        if syntax in NATIVE_TRANSFER_SYNTAXES:
            return "PixelData (7FE0,0010) has undefined length in a native transfer syntax"
        items = inst.pixel_data_items
        if items is not None and items < 0:
            return "encapsulated PixelData (7FE0,0010) is truncated (file ends inside it)"
        fragments = max(0, items - 1) if items is not None else available // 8
        if fragments < frames:
            return (
                f"NumberOfFrames (0028,0008) is {frames}, but encapsulated PixelData "
                f"(7FE0,0010) holds only {fragments} fragment(s)"
            )
        return ""
    declared = _bytes_per_frame(ds, inst.rows, inst.columns) * frames
    if inst.pixel_data_length > available:
        return (
            f"PixelData (7FE0,0010) declares {inst.pixel_data_length} bytes, the file holds "
            f"{available} (truncated)"
        )
    if (not syntax or syntax in NATIVE_TRANSFER_SYNTAXES) and inst.pixel_data_length < declared:
        return (
            f"Rows x Columns x NumberOfFrames ({inst.rows} x {inst.columns} x {frames}) declare "
            f"{declared} bytes, PixelData (7FE0,0010) holds {inst.pixel_data_length}"
        )
    return ""


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the first start-of-frame marker of a JPEG or JPEG-LS codestream."""
    i, n = 0, len(frame)
    if frame[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= n:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            rows = int.from_bytes(frame[i + 5 : i + 7], "big")
            cols = int.from_bytes(frame[i + 7 : i + 9], "big")
            return rows, cols
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SIZ marker segment of a JPEG 2000 codestream (or JP2 file)."""
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0 or start + 24 > len(frame):
        return None
    siz = frame[start + 4 :]
    x_siz, y_siz, x_off, y_off = (int.from_bytes(siz[k : k + 4], "big") for k in (4, 8, 12, 16))
    return y_siz - y_off, x_siz - x_off


def check_codestreams(ds: Dataset, inst: Instance) -> None:
    """Compare every compressed frame's own dimensions with Rows and Columns, before decoding.

    Raises
    ------
    InvalidInputError
        Naming the frame and the attribute when a codestream declares other dimensions, or its
        header cannot be read.
    """
    syntax = inst.transfer_syntax_uid
    if not syntax or syntax in NATIVE_TRANSFER_SYNTAXES or "PixelData" not in ds:
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    where = f"{inst.path}: instance {inst.sop_instance_uid}"
    try:
        for number, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames), 1):
            if syntax == _RLE:
                segments = int.from_bytes(frame[:4], "little") if len(frame) >= 64 else -1
                expected = _bytes_per_frame(ds, 1, 1)
                if segments != expected:
                    raise InvalidInputError(
                        f"{where}: frame {number}: RLE header declares {segments} segment(s); "
                        f"BitsAllocated (0028,0100) and SamplesPerPixel (0028,0002) need {expected}"
                    )
                continue
            if syntax in _JPEG_FAMILY:
                size = _jpeg_size(frame)
            elif syntax in _J2K_FAMILY:
                size = _j2k_size(frame)
            else:
                return
            if size is None:
                raise InvalidInputError(
                    f"{where}: frame {number}: the codestream does not declare its dimensions "
                    f"(transfer syntax {syntax})"
                )
            if size != (rows, cols):
                raise InvalidInputError(
                    f"{where}: frame {number}: codestream declares {size[0]} x {size[1]} pixels, "
                    f"Rows (0028,0010) x Columns (0028,0011) is {rows} x {cols}"
                )
    except InvalidInputError:
        raise
    except Exception as exc:  # a malformed item structure
        raise InvalidInputError(
            f"{where}: encapsulated PixelData (7FE0,0010) unreadable: {type(exc).__name__}: {exc}"
        ) from exc
