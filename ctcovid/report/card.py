"""The result card: one Secondary Capture image that states the result in words, for any viewer.

Many viewers show no TID 1500 SR at all, but every viewer shows an image. The card is one RGB
picture (:data:`CARD_SIZE` pixels square) that states, in large type, what the SR states: the
COVID-19 finding (present, absent or indeterminate) and the probability, then the threshold,
the model's name and version, the runtime, the date, the warning :data:`PRELIMINARY`, and the
key slice beside its class-activation heatmap. The text is burned into the pixels, so
BurnedInAnnotation is YES.

Its series: its own, not the heatmaps'. The card is the answer at a glance: a viewer shows a
series as one thumbnail, and a series that holds only cards shows the result in the study
browser itself. The heatmap series holds one image per key slice, is made only by
``ctcovid classify --heatmaps-dicom`` and is never sent; a card among them would be one image of
several and not the first one seen. Like the SR series, the card series derives from study,
series and model name (:func:`~ctcovid.report.uids.card_series_uid`), so every revision's card
sits in it, with InstanceNumber the SR's revision.

Its identity: the SOP Instance UID derives from the SR it accompanies
(:func:`~ctcovid.report.uids.card_sop_instance_uid`), whose UID digests what the result states,
its revision and the source header, so a revised result gets a new card and a resend the same
one. The pixels take no part: the text derives from what the SR states (the stated probability,
never a raw float), the date is when the card was made (as the SR's ContentDate), and the
heatmap's colours come from the model's raw activations, which may move in their last bits from
one CPU to another; they illustrate and state nothing.

The text is drawn with the scalable font that Pillow bundles (``ImageFont.load_default(size=)``,
Pillow >= 10.1 built with FreeType, as its wheels are): no font file of the system is read, so
the card looks the same on every machine.
"""

from __future__ import annotations

import copy
import datetime
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from ctcovid import __version__
from ctcovid.dicom.types import Series
from ctcovid.errors import ReportError
from ctcovid.report.equipment import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    add_algorithm_equipment,
)
from ctcovid.report.header import (
    apply_character_set,
    apply_time_zone,
    card_series_number,
    copy_source_modules,
    series_description,
    source_time_zone,
)
from ctcovid.report.heatmap import (
    overlay_rgb,
    patient_orientation_of,
    source_image_item,
)
from ctcovid.report.sr import key_slices
from ctcovid.report.uids import card_series_uid, card_sop_instance_uid
from ctcovid.report.validate import sr_summary
from ctcovid.results import ScanResult
from ctcovid.scans import stated_text

logger = logging.getLogger(__name__)

CARD_SERIES_DESCRIPTION = "ctcovid COVID-19 result card"
CARD_SIZE = 1024
PRELIMINARY = "AI result, preliminary, not verified by a physician"
#: The words the card gives each SR evaluation, the first thing a reader sees.
FINDING_WORDS = {
    "present": "COVID-19 PRESENT",
    "absent": "COVID-19 ABSENT",
    "indeterminate": "COVID-19 INDETERMINATE",
}
# Background of the finding's band: red, green, amber. Every text is light on dark: dark text on
# a light band beside the black page is lost by OCR binarisation (tesseract reads none of it).
_FINDING_COLOURS = {
    "present": ((176, 18, 18), (255, 255, 255)),
    "absent": ((20, 110, 40), (255, 255, 255)),
    "indeterminate": ((140, 80, 0), (255, 255, 255)),
}
_WARNING_COLOURS = ((0, 0, 0), (255, 210, 0))
_BACKGROUND = (0, 0, 0)
_TEXT = (255, 255, 255)
_MUTED = (200, 200, 200)
_MARGIN = 24


def card_key_slice(result: ScanResult) -> int:
    """The slice the card shows: the SR's first key slice (highest stated slice probability).

    Raises
    ------
    ReportError
        If the result names no key slice.
    """
    ranked = key_slices(result, 1)
    if not ranked:
        raise ReportError(
            f"Series {result.series_instance_uid}: the result names no key slice; a result card "
            "shows one."
        )
    return ranked[0]


def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # a Pillow built without FreeType
        raise ReportError(
            "Pillow has no FreeType support here (ImageFont.load_default(size=...) gave a bitmap "
            "font); the result card needs it. Install Pillow >= 10.1 from its wheels."
        )
    return font


def _fitted(draw: ImageDraw.ImageDraw, text: str, size: int, width: int) -> ImageFont.FreeTypeFont:
    """The bundled font at ``size``, or smaller until ``text`` fits ``width`` pixels."""
    while size > 12:
        font = _font(size)
        if draw.textlength(text, font=font) <= width:
            return font
        size -= 2
    return _font(size)


def _band(
    draw: ImageDraw.ImageDraw,
    top: int,
    height: int,
    text: str,
    size: int,
    colours: tuple[tuple[int, int, int], tuple[int, int, int]],
) -> int:
    """A full-width band of ``colours[0]`` with ``text`` centred in ``colours[1]``; its bottom."""
    background, foreground = colours
    draw.rectangle((0, top, CARD_SIZE - 1, top + height - 1), fill=background)
    font = _fitted(draw, text, size, CARD_SIZE - 2 * _MARGIN)
    draw.text((CARD_SIZE // 2, top + height // 2), text, font=font, fill=foreground, anchor="mm")
    return top + height


def _line(draw: ImageDraw.ImageDraw, top: int, text: str, size: int, fill: tuple[int, ...]) -> int:
    """One left-aligned line of text; returns where the next line starts."""
    font = _fitted(draw, text, size, CARD_SIZE - 2 * _MARGIN)
    draw.text((_MARGIN, top), text, font=font, fill=fill)
    return top + int(size * 1.35)


def _panel(rgb: np.ndarray, side: int) -> Image.Image:
    """An (H, W, 3) uint8 image scaled to ``side`` pixels square (bilinear; it is a picture)."""
    return Image.fromarray(rgb, mode="RGB").resize((side, side), Image.Resampling.BILINEAR)


def render_card(
    *,
    evaluation: str,
    probability_text: str,
    result: ScanResult,
    key_slice: np.ndarray,
    cam: np.ndarray | None,
    slice_index: int,
    moment: datetime.datetime,
) -> np.ndarray:
    """The card's pixels: (CARD_SIZE, CARD_SIZE, 3) uint8 RGB.

    Parameters
    ----------
    evaluation
        ``"present"``, ``"absent"`` or ``"indeterminate"``: what the SR states.
    probability_text
        The probability as the SR states it (``ctcovid.scans.stated_text``).
    result
        For the threshold, the model's name, version and runtime, and the slice counts.
    key_slice
        (H, W) uint8 lung-windowed slice the model saw.
    cam
        Its class-activation map (values in [0, 1]), or None when it could not be computed: the
        card then says so beside the slice.
    slice_index
        The key slice's index among the analysed slices (shown, counted from 1).
    moment
        When the result was stated, in the zone the card states its date in.
    """
    if evaluation not in FINDING_WORDS:
        raise ValueError(
            f"evaluation must be one of {sorted(FINDING_WORDS)}. Received: {evaluation!r}."
        )
    if key_slice.ndim != 2 or key_slice.dtype != np.uint8:
        raise ValueError(
            f"key_slice must be a 2D uint8 array. Received: shape={key_slice.shape}, "
            f"dtype={key_slice.dtype}."
        )
    image = Image.new("RGB", (CARD_SIZE, CARD_SIZE), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = _band(draw, 12, 56, PRELIMINARY, 36, _WARNING_COLOURS)
    y = _band(draw, y + 20, 128, FINDING_WORDS[evaluation], 88, _FINDING_COLOURS[evaluation])
    y = _line(draw, y + 16, f"Probability of COVID-19: {probability_text}", 56, _TEXT)
    y = _line(draw, y, f"Decision threshold: {result.threshold:g}", 34, _TEXT)
    model = result.model
    y = _line(draw, y, f"Model: {model.name} {model.version}, runtime {model.runtime}", 30, _MUTED)
    zone = moment.strftime("%z")
    stamp = moment.strftime("%Y-%m-%d %H:%M") + (f" (UTC{zone[:3]}:{zone[3:]})" if zone else "")
    y = _line(draw, y, f"Date: {stamp}", 30, _MUTED)
    y = _line(
        draw,
        y,
        f"Slices analysed: {result.n_slices_used} of {result.n_slices_total}",
        30,
        _MUTED,
    )
    side = min((CARD_SIZE - 3 * _MARGIN) // 2, CARD_SIZE - y - 2 * _MARGIN - 40)
    caption = _font(26)
    top = y + 8
    probability = stated_text(result.slice_probabilities[slice_index])
    left_caption = f"Key slice {slice_index + 1} (slice probability {probability})"
    draw.text((_MARGIN, top), left_caption, font=_fitted(draw, left_caption, 26, side), fill=_MUTED)
    right = 2 * _MARGIN + side
    draw.text(
        (right, top),
        "Heatmap (class activation)" if cam is not None else "Heatmap unavailable",
        font=caption,
        fill=_MUTED,
    )
    grey = np.repeat(key_slice[..., np.newaxis], 3, axis=2)
    image.paste(_panel(grey, side), (_MARGIN, top + 40))
    if cam is not None:
        image.paste(_panel(overlay_rgb(key_slice, cam), side), (right, top + 40))
    return np.asarray(image, dtype=np.uint8).copy()


def _moment(source: Dataset, now: datetime.datetime | None) -> datetime.datetime:
    """When the card is made, in the source's time zone (as the SR's ContentDate) or local."""
    moment = now or datetime.datetime.now(datetime.UTC)
    zone = source_time_zone(source)
    return moment.astimezone(zone) if zone is not None else moment.astimezone()


def build_result_card(
    result: ScanResult,
    series: Series,
    sr: Dataset,
    *,
    key_slice: np.ndarray,
    cam: np.ndarray | None,
    now: datetime.datetime | None = None,
) -> hd.sc.SCImage:
    """The result card that goes with ``sr``, the SR that reports ``result`` for ``series``.

    Parameters
    ----------
    result
        The result; the card shows its slice :func:`card_key_slice`.
    series
        The source series (patient and study modules, the key slice's instance).
    sr
        The SR built for ``result`` (any revision): the card states its evaluation and
        probability, takes its InstanceNumber, and its UID derives from the SR's.
    key_slice, cam
        The key slice as the model saw it ((H, W) uint8) and its class-activation map, or None.
    now
        When the card is made (default: now); tests fix it.

    Raises
    ------
    ReportError
        If the SR is not for the result's study and series, states no evaluation or
        probability, or the key slice's instance is not in ``series``.
    """
    summary = sr_summary(sr)
    sr_uid = summary["sop_instance_uid"]
    if summary["study_instance_uid"] != result.study_instance_uid or not sr_uid:
        raise ReportError(
            f"SR {sr_uid} is in study {summary['study_instance_uid']}, not in the result's "
            f"study {result.study_instance_uid}; cannot make its result card."
        )
    if summary["evaluation"] is None or summary["probability_covid"] is None:
        raise ReportError(
            f"SR {sr_uid} states no COVID-19 evaluation or probability; cannot make its card."
        )
    index = card_key_slice(result)
    by_uid = {instance.sop_instance_uid: instance for instance in series.instances}
    instance = by_uid.get(result.sop_instance_uids[index])
    if instance is None:
        raise ReportError(
            f"Series {series.series_instance_uid}: instance {result.sop_instance_uids[index]} "
            "of the key slice is not in the series."
        )
    source = series.header
    moment = _moment(source, now)
    pixels = render_card(
        evaluation=summary["evaluation"],
        probability_text=stated_text(summary["probability_covid"]),
        result=result,
        key_slice=key_slice,
        cam=cam,
        slice_index=index,
        moment=moment,
    )
    card = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=instance.header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=card_series_uid(
            result.study_instance_uid, result.series_instance_uid, result.model.name
        ),
        series_number=card_series_number(source),
        sop_instance_uid=card_sop_instance_uid(sr_uid),
        instance_number=int(sr.InstanceNumber),
        manufacturer=MANUFACTURER,
        patient_orientation=patient_orientation_of(instance),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(CARD_SERIES_DESCRIPTION, source, result),
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=f"ctcovid {__version__}",
        # As for the SR: the source's own SpecificCharacterSet is set below.
        specific_character_set=None,
    )
    apply_character_set(card, source)
    copy_source_modules(card, source)
    # The date drawn on the card is its ContentDate: the same moment, in the same zone.
    target: Dataset = card  # plain attribute values, as apply_time_zone writes them
    target.ContentDate, target.ContentTime = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")
    apply_time_zone(card, source, moment)
    add_algorithm_equipment(card, result.model)
    card.SourceImageSequence = [source_image_item(instance, result.frame_numbers[index])]
    # No SR UID here: a later revision's card (revise_card) is this one with another UID.
    card.DerivationDescription = (
        f"Result card: the COVID-19 finding and probability its SR states, with key slice "
        f"{index + 1} and its class activation map"
    )
    card.ImageComments = PRELIMINARY
    card.BurnedInAnnotation = "YES"
    card.BodyPartExamined = "CHEST"
    logger.debug("Built result card %s for SR %s", card.SOPInstanceUID, sr_uid)
    return card


def revise_card(first: Dataset, sr: Dataset) -> Dataset:
    """The card of ``sr``, a later revision of the SR whose card is ``first`` (a copy).

    The same result stated again as revision n (batch after the node, say): the same pixels,
    the UID of ``sr``'s card and its InstanceNumber, as :func:`build_result_card` would make it.
    """
    card = copy.deepcopy(first)
    uid = card_sop_instance_uid(str(sr.SOPInstanceUID))
    card.SOPInstanceUID = uid
    meta = getattr(card, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = uid
    card.InstanceNumber = int(sr.InstanceNumber)
    return card


def card_path_for(sr_path: Path, card_dir: Path) -> Path:
    """Where the card of the SR file ``sr_path`` (named by its SOP Instance UID) is kept."""
    return card_dir / f"{card_sop_instance_uid(sr_path.stem)}.dcm"


def write_card(card: Dataset, path: str | Path) -> Path:
    """Write ``card`` as a DICOM Part 10 file and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save_as(path, enforce_file_format=True)
    return path
