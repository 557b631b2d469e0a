"""Ingest as a whole: one parse per file, decoding while the scan goes on, and a preprocess
command that starts without the deep-learning stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRBigEndian

import dicom_fixtures
from ctcovid.config import IngestConfig
from ctcovid.dicom import load_series
from ctcovid.dicom import pixels as pixels_module
from ctcovid.dicom.pixels import read_native
from ctcovid.preprocess import preprocess_folder, preprocess_series

CONFIG = IngestConfig(image_size=32, min_slices=4)
ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, **spec) -> dicom_fixtures.StudyInfo:
    base = {"positive": True, "n_slices": 6, "size": 64}
    return dicom_fixtures.write_study(
        tmp_path / "study", dicom_fixtures.StudySpec(**(base | spec)), seed=5
    )


def _high_bits_set(path: Path) -> None:
    """12 stored bits, the 4 unused high bits full of noise (PS3.5 8.1.1 says: ignore them)."""
    ds = pydicom.dcmread(path)
    words = ds.pixel_array.astype(np.uint16) & 0x0FFF
    noise = np.random.default_rng(1).integers(0, 16, words.shape, dtype=np.uint16) << 12
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = (words | noise).astype("<u2").tobytes()
    ds.save_as(path)


def _big_endian(path: Path) -> None:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)


def _eight_bit(path: Path) -> None:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (arr.astype(np.int32) % 256).astype(np.uint8).tobytes()
    ds.save_as(path)


VARIANTS = {
    "explicit signed": ({}, None),
    "implicit": ({"transfer_syntax": "implicit"}, None),
    "unsigned 12 bit": ({"signed": False}, None),
    "signed, noise in unused bits": ({"signed": True}, _high_bits_set),
    "unsigned, noise in unused bits": ({"signed": False}, _high_bits_set),
    "big endian": ({}, _big_endian),
    "8 bit": ({}, _eight_bit),
    "enhanced multi-frame": ({"enhanced": True}, None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_pixels_read_at_the_scanned_offset_equal_pydicoms_decoder(
    tmp_path: Path, variant: str
) -> None:
    spec, edit = VARIANTS[variant]
    info = write(tmp_path, **spec)
    if edit is not None:
        for path in info.paths:
            edit(path)
    series = load_series(info.ct_dir, IngestConfig(min_slices=1), for_classification=False)
    instances = {ref.instance.sop_instance_uid: ref.instance for ref in series.slices}
    for inst in instances.values():
        native = read_native(inst)
        assert native is not None, f"{variant}: not read natively"
        stored, _ = native
        expected = pixel_array(pydicom.dcmread(inst.path))
        expected = expected.reshape(stored.shape)
        np.testing.assert_array_equal(stored, expected)
        assert stored.dtype.isnative and stored.dtype.kind == expected.dtype.kind


def test_native_series_is_parsed_once_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = write(tmp_path)
    series = load_series(info.ct_dir, CONFIG)
    expected = preprocess_series(series, CONFIG, workers=1).slices

    def no_second_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel pass parsed a file again")

    monkeypatch.setattr(pixels_module.pydicom, "dcmread", no_second_parse)
    np.testing.assert_array_equal(preprocess_series(series, CONFIG, workers=1).slices, expected)


def test_a_file_rewritten_after_the_scan_is_read_again_in_full(tmp_path: Path) -> None:
    info = write(tmp_path)
    series = load_series(info.ct_dir, CONFIG)
    inst = series.slices[2].instance
    ds = pydicom.dcmread(inst.path)
    ds.PixelData = (ds.pixel_array + 100).astype(ds.pixel_array.dtype).tobytes()
    ds.add_new(0x00091010, "LO", "shifts the pixel data element")  # private: a new offset
    ds.save_as(inst.path)
    stat = inst.path.stat()
    os.utime(inst.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert read_native(inst) is None
    hu = next(h for ref, h in pixels_module.iter_hu([series.slices[2]]))
    np.testing.assert_array_equal(hu, pydicom.dcmread(inst.path).pixel_array.astype(np.float32))


def test_preprocess_folder_equals_scan_then_preprocess(tmp_path: Path) -> None:
    info = write(tmp_path, add_localizer=True, add_junk=True, shuffle_names=True)
    plain_series = load_series(info.ct_dir, CONFIG, for_classification=False)
    plain = preprocess_series(plain_series, CONFIG)
    for workers in (1, 3):
        series, fast = preprocess_folder(info.ct_dir, CONFIG, workers=workers)
        np.testing.assert_array_equal(fast.slices, plain.slices)
        np.testing.assert_array_equal(fast.z_mm, plain.z_mm)
        assert fast.sop_instance_uids == plain.sop_instance_uids
        assert fast.warnings == plain.warnings and fast.warnings
        assert series.series_instance_uid == plain_series.series_instance_uid


def test_an_early_decode_that_does_not_apply_is_redone_in_slice_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctcovid.preprocess as preprocess_module

    info = write(tmp_path)
    plain = preprocess_series(load_series(info.ct_dir, CONFIG), CONFIG)
    monkeypatch.setattr(preprocess_module, "read_native", lambda inst: None)
    _, fast = preprocess_folder(info.ct_dir, CONFIG, workers=2)
    np.testing.assert_array_equal(fast.slices, plain.slices)
    assert fast.sop_instance_uids == plain.sop_instance_uids


def test_preprocess_folder_drops_a_truncated_file_as_the_plain_path_does(tmp_path: Path) -> None:
    info = write(tmp_path)
    broken = sorted(info.ct_dir.iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:-1000])  # header intact, pixel data cut short
    plain = preprocess_series(load_series(info.ct_dir, CONFIG), CONFIG)
    _, fast = preprocess_folder(info.ct_dir, CONFIG, workers=2)
    assert len(fast) == len(plain) == 5
    assert fast.sop_instance_uids == plain.sop_instance_uids
    np.testing.assert_array_equal(fast.slices, plain.slices)
    assert fast.warnings == plain.warnings
    assert [w for w in fast.warnings if str(broken) in w and "truncated" in w]


def test_preprocess_command_does_not_import_tensorflow_or_keras(tmp_path: Path) -> None:
    info = write(tmp_path)
    out = tmp_path / "slices.npz"
    wrapper = (
        "import sys\n"
        "from ctcovid.cli.main import app\n"
        "try:\n"
        "    app(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules)\n"
        "print('heavy modules:', heavy)\n"
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, "preprocess", str(info.ct_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "heavy modules: []" in proc.stdout
    with np.load(out) as npz:
        assert npz["slices"].shape == (6, 256, 256)
