"""Every bad input of the data layer is a one-line UserError naming the file and the problem."""

import gzip
import json
import math
import re
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.cli import main
from samadapt.data import Preprocessing, SliceDataset, VolumeSlices
from samadapt.data.manifest import Case
from samadapt.data.readers import geometry_of, read_header, read_volume, write_volume
from samadapt.errors import UserError

PREP = Preprocessing(image_size=16)


def _geometry(size, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    return {"size": list(size), "spacing": list(spacing), "origin": list(origin),
            "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}


def _write(tmp_path, name, array, **geometry):
    return write_volume(np.asarray(array), _geometry(np.asarray(array).shape[::-1], **geometry), tmp_path / name)


@pytest.fixture
def image(tmp_path):
    return _write(tmp_path, "img.nii.gz", np.random.default_rng(0).random((4, 8, 8)).astype(np.float32))


def _fails(match, fn, *args, **kwargs):
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    _fails(r"nope\.nii\.gz: file not found", VolumeSlices, tmp_path / "nope.nii.gz", PREP)


def test_corrupt_nifti(tmp_path, image):
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(image.read_bytes()[:200])
    _fails(r"cut\.nii\.gz: cannot read the image", VolumeSlices, truncated, PREP)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not an image at all" * 50))
    _fails(r"garbage\.nii\.gz: cannot read the image", VolumeSlices, garbage, PREP)


def test_4d_without_channel(tmp_path):
    volumes = [sitk.GetImageFromArray(np.full((3, 4, 5), float(c), np.float32)) for c in range(2)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp_path / "4d.nii.gz"))
    _fails(r"4d\.nii\.gz: 4D image with 2 volumes — set channel=0\.\.1", VolumeSlices, tmp_path / "4d.nii.gz", PREP)
    assert sitk.GetArrayFromImage(read_volume(tmp_path / "4d.nii.gz", channel=1)).min() == 1.0
    _fails("channel=5 but the image has 2", read_volume, tmp_path / "4d.nii.gz", channel=5)


def test_label_shape_mismatch(tmp_path, image):
    label = _write(tmp_path, "lab.nii.gz", np.zeros((4, 8, 7), np.uint8))
    message = _fails(r"lab\.nii\.gz: label shape \(7, 8, 4\) differs from image", VolumeSlices, image, PREP, "MR",
                     label)
    assert "resample_labels=true" in message


def test_geometry_mismatch_and_resampling(tmp_path, image):
    label = _write(tmp_path, "lab.nii.gz", np.ones((4, 8, 8), np.uint8), origin=(0.5, 0.0, 0.0))
    _fails(r"lab\.nii\.gz: label geometry .* differs from image .* 1e-3 mm", VolumeSlices, image, PREP, "MR", label)
    within = _write(tmp_path, "close.nii.gz", np.ones((4, 8, 8), np.uint8), origin=(0.0005, 0.0, 0.0))
    assert VolumeSlices(image, PREP, "MR", within).labels.max() == 1
    resampled = VolumeSlices(image, Preprocessing(image_size=16, resample_labels=True), "MR", label)
    assert resampled.labels.max() == 1


def test_non_integer_and_negative_labels(tmp_path, image):
    fractional = _write(tmp_path, "frac.nii.gz", np.full((4, 8, 8), 0.5, np.float32))
    _fails(r"frac\.nii\.gz: label map has non-integer values \(e\.g\. 0\.5\)", VolumeSlices, image, PREP, "MR",
           fractional)
    negative = _write(tmp_path, "neg.nii.gz", np.full((4, 8, 8), -1, np.int16))
    _fails(r"neg\.nii\.gz: label values \{-1\} include negatives", VolumeSlices, image, PREP, "MR", negative)


def test_labels_at_or_above_num_classes(tmp_path, image):
    values = np.zeros((4, 8, 8), np.uint8)
    values[0, 0, :3] = [1, 4, 4]
    label = _write(tmp_path, "lab.nii.gz", values)
    _fails(r"lab\.nii\.gz: values \{0,1,4\} but num_classes=2 — set num_classes=5 or remap labels",
           VolumeSlices, image, PREP, "MR", label, num_classes=2)
    # the cached entry is re-checked against the num_classes of a later run
    case = Case("c", image, label, "MR", "train")
    assert SliceDataset([case], PREP, cache_dir=tmp_path / "cache", num_classes=5).num_classes == 5
    _fails(r"lab\.nii\.gz: values \{0,1,4\} but num_classes=3", SliceDataset, [case], PREP,
           cache_dir=tmp_path / "cache", num_classes=3)


def test_nan_volume_names_the_all_nan_slice(tmp_path):
    array = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    array[2] = np.nan
    array[0, 0, 0] = np.inf
    path = _write(tmp_path, "nan.nii.gz", array)
    _fails(r"nan\.nii\.gz: 65 NaN/Inf voxels; slices z=2 are entirely NaN/Inf", VolumeSlices, path, PREP)


def _dicom_series(folder, uid, slices=3):
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(slices):
        image = sitk.GetImageFromArray(np.full((6, 5), 100 * z, np.int16))
        image.SetSpacing((0.9, 0.8))
        for tag, value in {"0020|000e": uid, "0020|000d": "1.2.3", "0008|0060": "MR",
                           "0020|0032": f"0\\0\\{2.5 * z}", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0013": str(z + 1), "0008|0018": f"{uid}.{z + 1}",
                           "0018|0050": "2.5"}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid}_{z}.dcm"))
        writer.Execute(image)


def test_dicom_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here", encoding="utf-8")
    _fails(r"empty: no DICOM series found in this folder", VolumeSlices, empty, PREP)
    _dicom_series(tmp_path / "two", "1.2.826.0.1.1")
    _dicom_series(tmp_path / "two", "1.2.826.0.1.2", slices=2)
    _fails(r"two: 2 DICOM series \(1\.2\.826\.0\.1\.1, 1\.2\.826\.0\.1\.2\) — choose one with series_uid",
           VolumeSlices, tmp_path / "two", PREP)
    volume = read_volume(tmp_path / "two", series_uid="1.2.826.0.1.1")
    assert volume.GetSize() == (5, 6, 3)
    np.testing.assert_allclose(volume.GetSpacing(), (0.9, 0.8, 2.5), atol=1e-6)
    assert sitk.GetArrayFromImage(volume)[:, 0, 0].tolist() == [0, 100, 200]


# --- NIfTI headers: one check for read_header (data check) and read_volume (the stages) ------------------

def _nifti_with(tmp_path, name, offset, fmt, *values, array=None, compress=True):
    """A small float32 NIfTI whose header bytes at ``offset`` are ``struct.pack('<' + fmt, *values)``."""
    array = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32) * 100 if array is None else array
    raw = bytearray(_write(tmp_path, "plain.nii", array).read_bytes())
    raw[offset:offset + struct.calcsize("<" + fmt)] = struct.pack("<" + fmt, *values)
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(raw)) if compress else bytes(raw))
    return path


@pytest.mark.parametrize("dims, shown", [((3, 8, 0, 4), "dims (8, 0, 4) include 0"),
                                         ((3, 8, 8, -2), "dims (8, 8, -2) include -2")])
def test_nifti_dims_below_one_are_refused_by_header_and_decode(tmp_path, dims, shown):
    """ITK reads a 0 or negative dim as 1: the volume (and a mask written for it) would get another shape."""
    path = _nifti_with(tmp_path, "dims.nii.gz", 40, "8h", *dims, *[1] * (8 - len(dims)))
    for reader in (read_header, read_volume):
        _fails(re.escape(f"{path}: corrupt NIfTI header — {shown}"), reader, path)
    bad_rank = _nifti_with(tmp_path, "rank.nii.gz", 40, "8h", 9, 8, 8, 4, 1, 1, 1, 1)
    _fails(re.escape(f"{bad_rank}: corrupt NIfTI header — dim[0]=9 dimensions (must be 1..7)"), read_volume, bad_rank)
    _fails(re.escape(f"{bad_rank}: cannot read the header"), read_header, bad_rank)  # ITK refuses it first


def test_nifti_scaling_is_checked_by_header_and_decode(tmp_path):
    overflow = _nifti_with(tmp_path, "overflow.nii.gz", 112, "f", 1e38)
    for reader in (read_header, read_volume):
        _fails(r"overflow\.nii\.gz: NIfTI scl_slope=1e\+38, scl_inter=0 scale .* beyond float32", reader, overflow)
    for name, values in (("slope_inf.nii", (math.inf, 0.0)), ("inter_inf.nii", (1.0, -math.inf))):
        path = _nifti_with(tmp_path, name, 112, "2f", *values, compress=False)
        for reader in (read_header, read_volume):
            _fails(f"{name}: NIfTI scl_(slope|inter)=-?inf is not finite", reader, path)
    # int16 voxels whose type's whole range could overflow: decided on the stored values
    counts = np.arange(256, dtype=np.int16).reshape(4, 8, 8)
    path = _nifti_with(tmp_path, "int16.nii.gz", 112, "2f", 1e34, 0.0, array=counts)
    assert read_header(path)["pixel_type"] == "32-bit float"  # 255 * 1e34 fits in float32
    assert sitk.GetArrayFromImage(read_volume(path)).max() == pytest.approx(2.55e36, rel=1e-5)
    # sensible scaling (CT-like slope/intercept) and nibabel's "unset" NaN pass and are applied as ITK does
    scaled = _nifti_with(tmp_path, "ct.nii.gz", 112, "2f", 2.0, -1024.0, array=counts)
    read_header(scaled)
    assert sitk.GetArrayFromImage(read_volume(scaled)).min() == -1024.0
    unset = _nifti_with(tmp_path, "unset.nii.gz", 112, "2f", math.nan, math.nan, array=counts)
    assert sitk.GetArrayFromImage(read_volume(unset)).max() == 255


# --- DICOM series: one check for read_header and read_volume -----------------------------------------

def _series(folder, z_mm, names=None, orientation=None, tags=None):
    """A series of 6 x 5 slices at positions ``z_mm``, files named ``names`` (default s0.dcm, ...)."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z, position in enumerate(z_mm):
        image = sitk.GetImageFromArray(np.full((6, 5), z, np.int16))
        for tag, value in {"0020|000e": "1.2.9", "0008|0018": f"1.2.9.{z}", "0020|0032": f"0\\0\\{position}",
                           "0020|0037": (orientation or {}).get(z, "1\\0\\0\\0\\1\\0"), **(tags or {})}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / (names[z] if names else f"s{z}.dcm")))
        writer.Execute(image)
    return folder


def test_dicom_series_problems_are_refused_by_header_and_decode(tmp_path):
    cases = {
        "gap": (_series(tmp_path / "gap", [0, 2, 4, 8, 10]),
                "slice positions jump from 4.0 to 8.0 mm (missing slice?) between s2.dcm and s3.dcm; the others are "
                "2 mm apart"),
        "uneven": (_series(tmp_path / "uneven", [0, 2, 4, 5, 7, 9]),
                   "slices s2.dcm and s3.dcm at 4.0 and 5.0 mm are 1 mm apart, the others 2 mm"),
        "duplicate": (_series(tmp_path / "duplicate", [0, 2, 2, 4]), "two slices at 2.0 mm (s1.dcm, s2.dcm)"),
        "orientation": (_series(tmp_path / "orientation", [0, 2, 4], orientation={1: "0\\1\\0\\1\\0\\0"}),
                        "slices s0.dcm and s1.dcm have different orientations"),
    }
    truncated = _series(tmp_path / "truncated", [0, 2, 4, 6])
    (truncated / "s1.dcm").write_bytes((truncated / "s1.dcm").read_bytes()[:300])
    cases["truncated"] = (truncated, "s1.dcm looks like a DICOM slice but cannot be read (truncated or corrupt?)")
    for folder, says in cases.values():
        for reader in (read_header, read_volume):
            _fails(re.escape(f"{folder}: {says}"), reader, folder)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "x.dcm").write_bytes((truncated / "s1.dcm").read_bytes())
    _fails(r"alone: x\.dcm looks like a DICOM slice but cannot be read", read_header, alone)


def test_dicom_header_reads_the_spacing_from_the_slice_positions(tmp_path, capsys):
    """Slice thickness 5 mm, slices 2 mm apart, files named against the position order and no instance
    numbers (GDCM then keeps the name order): header and volume agree on the geometry, slices in order."""
    folder = _series(tmp_path / "series", [0, 2, 4, 6], names=["c.dcm", "a.dcm", "d.dcm", "b.dcm"],
                     tags={"0018|0050": "5"})
    header, volume = read_header(folder), read_volume(folder)
    assert header["size"] == list(volume.GetSize()) == [5, 6, 4]
    np.testing.assert_allclose(header["spacing"], (1.0, 1.0, 2.0))
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(header[key], geometry_of(volume)[key], atol=1e-6)
    assert sitk.GetArrayFromImage(volume)[:, 0, 0].tolist() == [0, 1, 2, 3]
    # data check without num_classes= compares the label with these header geometry: a label on the true grid passes
    label = write_volume(np.zeros((4, 6, 5), np.uint8), geometry_of(volume), tmp_path / "label.nii.gz")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "s", "image": str(folder), "label": str(label), "modality": "MR"}) + "\n",
                        encoding="utf-8")
    assert main(["data", "check", str(manifest)]) == 0
    assert "1,1,2" in capsys.readouterr().out
