"""Tests for the synthetic DICOM fixture generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

import dicom_fixtures as fx

SIZE = 64
N = 8


def _hu(n: int = N, size: int = SIZE, *, positive: bool = True, seed: int = 0) -> np.ndarray:
    return fx.chest_phantom(n, size, positive=positive, rng=np.random.default_rng(seed)).hu


def _write(tmp_path: Path, hu: np.ndarray, **kwargs: object) -> list[Path]:
    study = fx.make_identity(0, 0)
    return fx.write_ct_series(
        hu, tmp_path / "ct", study=study, series_instance_uid=fx.make_uid("t", 1), **kwargs
    )


def _read_hu(paths: list[Path]) -> np.ndarray:
    return np.stack([apply_modality_lut(pydicom.dcmread(p).pixel_array, pydicom.dcmread(p))
                     for p in paths])


# ---------------------------------------------------------------- phantom


def test_phantom_shapes_and_anatomy() -> None:
    ph = fx.chest_phantom(12, 96, positive=False, rng=np.random.default_rng(1),
                          lung_margin_slices=2)
    assert ph.hu.shape == ph.lesion_mask.shape == ph.lung_mask.shape == (16, 96, 96)
    assert ph.hu.dtype == np.int16
    assert not ph.lesion_mask.any()
    # Margin slices have no lung; all others do.
    assert list(ph.lung_slices) == list(range(2, 14))
    assert ph.hu[:, 0, 0].mean() == pytest.approx(-1000, abs=20)
    # Parenchyma (median resists vessels) near -850 with modest noise.
    lung = ph.hu[ph.lung_mask].astype(float)
    assert np.median(lung) == pytest.approx(-850, abs=20)
    assert ph.hu.max() > 500  # spine


def test_phantom_positive_has_visible_lesions() -> None:
    ph = fx.chest_phantom(24, 128, positive=True, rng=np.random.default_rng(2),
                          consolidation=True)
    lesion_slices = ph.lesion_slices
    assert len(lesion_slices) >= 0.7 * 24
    frac = [ph.lesion_mask[k].sum() / ph.lung_mask[k].sum() for k in lesion_slices]
    assert 0.04 < float(np.median(frac)) < 0.25
    assert (ph.lesion_mask <= ph.lung_mask).all()
    les = ph.hu[ph.lesion_mask]
    assert -650 < np.median(les) < -150
    assert les.max() > -100  # consolidation core


def test_phantom_nodules_negative() -> None:
    ph = fx.chest_phantom(16, 96, positive=False, nodules=True, rng=np.random.default_rng(3))
    assert not ph.lesion_mask.any()


def test_phantom_deterministic() -> None:
    a = _hu(seed=5)
    b = _hu(seed=5)
    c = _hu(seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------- writer


def test_make_uid() -> None:
    uid = fx.make_uid("a", 1)
    assert uid == fx.make_uid("a", 1) != fx.make_uid("a", 2)
    assert uid.startswith("2.25.") and uid.is_valid
    assert fx.make_identity(3, 4) == fx.make_identity(3, 4)


@pytest.mark.parametrize(
    ("signed", "slope", "intercept"),
    [(True, 1.0, None), (False, 1.0, None), (True, 0.5, -1024.0), (False, 0.5, -1024.0),
     (True, 1.0, -1024.0), (False, 2.0, -1024.0)],
)
def test_hu_round_trip(tmp_path: Path, signed: bool, slope: float,
                       intercept: float | None) -> None:
    hu = _hu()
    paths = _write(tmp_path, hu, signed=signed, rescale_slope=slope,
                   rescale_intercept=intercept)
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == int(signed)
    assert ds.BitsStored == 16 if signed else ds.BitsStored in (12, 16)
    assert int(ds.pixel_array.max()) < 2 ** (ds.BitsStored - int(signed))
    back = _read_hu(paths)
    if slope <= 1.0:
        np.testing.assert_array_equal(back, hu)
    else:
        assert np.abs(back - hu).max() <= slope / 2


def test_headers_and_geometry(tmp_path: Path) -> None:
    hu = _hu()
    paths = _write(tmp_path, hu, slice_thickness_mm=2.0, z0_mm=-100.0)
    dss = [pydicom.dcmread(p) for p in paths]
    ds = dss[0]
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == fx.CT_IMAGE_STORAGE
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "CT" and ds.Manufacturer == fx.MANUFACTURER
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert ds.RescaleType == "HU" and ds.Rows == ds.Columns == SIZE
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
               "FrameOfReferenceUID", "KVP", "WindowCenter", "SliceLocation"):
        assert kw in ds, kw
    zs = [float(d.ImagePositionPatient[2]) for d in dss]
    assert zs == pytest.approx([-100.0 + 2.0 * k for k in range(N)])
    assert [int(d.InstanceNumber) for d in dss] == list(range(1, N + 1))
    assert [p.name for p in paths] == [f"IM{k:04d}.dcm" for k in range(1, N + 1)]
    assert len({d.SOPInstanceUID for d in dss}) == N
    # Part 10 preamble and prefix.
    assert paths[0].read_bytes()[128:132] == b"DICM"


def test_reverse_and_shuffle(tmp_path: Path) -> None:
    paths = _write(tmp_path, _hu(), reverse_instance_numbers=True, shuffle_names=True)
    dss = [pydicom.dcmread(p) for p in paths]
    assert [int(d.InstanceNumber) for d in dss] == list(range(N, 0, -1))
    assert not any(p.name.startswith("IM") for p in paths)
    zs = [float(d.ImagePositionPatient[2]) for d in dss]
    assert zs == sorted(zs)


def test_implicit_vr(tmp_path: Path) -> None:
    paths = _write(tmp_path, _hu(), transfer_syntax="implicit")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


@pytest.mark.parametrize("ts", fx.available_transfer_syntaxes())
@pytest.mark.parametrize("signed", [True, False])
def test_every_transfer_syntax_decodes(tmp_path: Path, ts: str, signed: bool) -> None:
    hu = _hu(n=3)
    paths = _write(tmp_path, hu, transfer_syntax=ts, signed=signed)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == fx.TRANSFER_SYNTAXES[ts]
    np.testing.assert_array_equal(_read_hu(paths), hu)


def test_core_transfer_syntaxes_available() -> None:
    got = fx.available_transfer_syntaxes()
    assert {"explicit", "implicit"} <= set(got)
    assert set(got) <= set(fx.TRANSFER_SYNTAXES)


@pytest.mark.parametrize("ts", ["explicit", "rle"])
@pytest.mark.parametrize("head_first", [False, True])
def test_enhanced(tmp_path: Path, ts: str, head_first: bool) -> None:
    if ts not in fx.available_transfer_syntaxes():
        pytest.skip(f"{ts} encoder not available")
    hu = _hu()
    paths = _write(tmp_path, hu, enhanced=True, transfer_syntax=ts, signed=False,
                   reverse_instance_numbers=head_first, z0_mm=10.0)
    assert len(paths) == 1
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == fx.ENHANCED_CT_IMAGE_STORAGE
    assert int(ds.NumberOfFrames) == N
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        1, 0, 0, 0, 1, 0]
    transform = shared.PixelValueTransformationSequence[0]
    assert transform.RescaleType == "HU"
    frames = ds.pixel_array
    assert frames.shape == (N, SIZE, SIZE)
    zs = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
          for f in ds.PerFrameFunctionalGroupsSequence]
    expected = [10.0 + 1.25 * k for k in range(N)]
    assert zs == pytest.approx(expected[::-1] if head_first else expected)
    order = np.argsort(zs)
    back = np.stack([apply_modality_lut(frames[i], transform) for i in order])
    np.testing.assert_array_equal(back, hu)


def test_localizer_and_mr(tmp_path: Path) -> None:
    study = fx.make_identity(0, 1)
    loc = fx.write_localizer(tmp_path / "loc", study, hu=_hu())
    ds = pydicom.dcmread(loc)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert ds.pixel_array.shape == (N, SIZE)
    assert ds.StudyInstanceUID == study.study_instance_uid
    mr = fx.write_mr_series(tmp_path / "mr", study, n=3)
    assert len(mr) == 3
    mds = pydicom.dcmread(mr[0])
    assert mds.SOPClassUID == fx.MR_IMAGE_STORAGE and mds.Modality == "MR"
    assert mds.StudyInstanceUID == study.study_instance_uid
    assert mds.SeriesInstanceUID != ds.SeriesInstanceUID
    assert mds.pixel_array.shape == (32, 32)


def test_junk(tmp_path: Path) -> None:
    paths = _write(tmp_path, _hu(n=2))
    junk = fx.write_junk(tmp_path / "junk", paths[0])
    assert set(junk) == {"text", "truncated", "no_pixel_data", "duplicate", "empty"}
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(junk["text"])
    assert junk["empty"].stat().st_size == 0
    assert junk["duplicate"].read_bytes() == paths[0].read_bytes()
    nopix = pydicom.dcmread(junk["no_pixel_data"])
    assert "PixelData" not in nopix and nopix.Modality == "CT"
    full = paths[0].stat().st_size
    assert 0 < junk["truncated"].stat().st_size < full
    trunc = pydicom.dcmread(junk["truncated"], force=True)
    with pytest.raises(Exception):  # noqa: B017 - any decode failure will do
        _ = trunc.pixel_array


# ---------------------------------------------------------------- studies


def test_write_study_layout(tmp_path: Path) -> None:
    spec = fx.StudySpec(positive=True, n_slices=6, size=SIZE, add_localizer=True,
                        add_mr_series=True, add_junk=True, lung_margin_slices=1)
    info = fx.write_study(tmp_path / "s", spec, seed=4, index=2)
    assert info.label == "covid" and info.ct_dir == tmp_path / "s" / "ct"
    assert len(info.paths) == 8 and info.hu.shape == (8, SIZE, SIZE)
    assert info.lesion_mask.any()
    assert info.localizer_path is not None and info.localizer_path.parent.name == "localizer"
    assert len(info.mr_paths) == 3
    assert set(info.junk) == {"text", "truncated", "no_pixel_data", "duplicate", "empty"}
    uids = {pydicom.dcmread(p).StudyInstanceUID for p in [*info.paths, *info.mr_paths]}
    assert uids == {info.study_instance_uid}


def test_generate_studies(tmp_path: Path) -> None:
    infos = fx.generate_studies(tmp_path / "a", 4, seed=7, n_slices=6, size=SIZE)
    assert [i.label for i in infos] == ["covid", "non-covid", "covid", "non-covid"]
    assert infos[0].lesion_mask.any() and not infos[1].lesion_mask.any()
    assert {i.spec.signed for i in infos} == {True, False}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [m["study_dir"] for m in manifest] == [f"study_{k:03d}" for k in range(4)]
    assert {"study_dir", "study_instance_uid", "series_instance_uid", "label",
            "patient_id"} == set(manifest[0])
    for info in infos:
        by_z = sorted(info.paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
        np.testing.assert_array_equal(_read_hu(by_z), info.hu)

    again = fx.generate_studies(tmp_path / "b", 4, seed=7, n_slices=6, size=SIZE)
    assert [i.ct_series_instance_uid for i in again] == [i.ct_series_instance_uid for i in infos]
    for x, y in zip(infos, again, strict=True):
        assert [p.name for p in x.paths] == [p.name for p in y.paths]
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(x.paths, y.paths, strict=True))
    other = fx.generate_studies(tmp_path / "c", 2, seed=8, n_slices=6, size=SIZE)
    assert other[0].study_instance_uid != infos[0].study_instance_uid

    with pytest.raises(TypeError):
        fx.generate_studies(tmp_path / "d", 1, bogus=True)


def test_generate_studies_overrides(tmp_path: Path) -> None:
    infos = fx.generate_studies(tmp_path, 3, n_slices=4, size=SIZE, enhanced=True,
                                shuffle_names=False)
    assert all(len(i.paths) == 1 for i in infos)
    assert all(int(pydicom.dcmread(i.paths[0]).NumberOfFrames) == 4 for i in infos)


def test_cov19_layout(tmp_path: Path) -> None:
    scans = fx.write_cov19_layout(tmp_path, n_per_class=2, n_slices=5, size=SIZE, split="val")
    assert len(scans) == 4
    for label in ("covid", "non-covid"):
        for n in range(2):
            d = tmp_path / "val" / label / f"ct_scan_{n}"
            assert sorted(p.name for p in d.iterdir()) == [f"{k}.jpg" for k in range(5)]
    img = Image.open(tmp_path / "val" / "covid" / "ct_scan_0" / "0.jpg")
    assert img.mode == "L" and img.size == (SIZE, SIZE)
    arr = np.asarray(img)
    # Air (-1000 HU) sits at (350 / 1500) * 255 ~ 60 in this window.
    assert abs(float(arr[:4, :4].mean()) - 60) < 8
    assert fx.lung_window_uint8(np.array([-1350, -600, 150, 2000])).tolist() == [0, 128, 255, 255]


def test_labelled_dicom(tmp_path: Path) -> None:
    infos = fx.write_labelled_dicom(tmp_path, n_per_class=1, seed=1, n_slices=4, size=SIZE)
    assert {i.study_dir.parent.name for i in infos} == {"covid", "non-covid"}
    for info in infos:
        assert info.study_dir.parent.name == info.label
        assert all(p.is_file() for p in info.paths)
