"""Every bad input of the data layer is a one-line UserError naming the file and the problem."""

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.data import Preprocessing, SliceDataset, VolumeSlices
from samadapt.data.manifest import Case
from samadapt.data.readers import read_volume, write_volume
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
    message = _fails(r"lab\.nii\.gz: label shape \(7, 8, 4\) differs from image", VolumeSlices, image, PREP, "MR", label)
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
    _fails(r"frac\.nii\.gz: label map has non-integer values \(e\.g\. 0\.5\)", VolumeSlices, image, PREP, "MR", fractional)
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
