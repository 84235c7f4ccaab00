"""Geometry: round trips, LPS vs RAS, reorientation, slice ↔ volume exactness."""

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from samadapt.data import Preprocessing, VolumeSlices
from samadapt.data.geometry import InPlane, canonical_transform, from_canonical, to_canonical
from samadapt.data.readers import geometry_of, read_volume, write_volume

OBLIQUE = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # index i → -y (A), j → -z (I), k → +x (L)


def _geometry(size, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    return {
        "size": list(size),
        "spacing": list(spacing),
        "origin": list(origin),
        "direction": list(map(float, direction)),
    }


def _head(shape_zyx=(12, 20, 16), seed=0):
    """A blob 'head' with a smaller 'brain' label inside (z, y, x)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    radius = np.sqrt(z**2 + (y * 1.1) ** 2 + (x * 0.9 + 0.1 * y) ** 2)
    image = np.where(radius < 0.9, 100.0 + 50 * np.cos(3 * y) + 30 * x, 0.0)
    image += np.random.default_rng(seed).normal(0, 2, shape_zyx) * (radius < 0.9)
    return image.astype(np.float32), (radius < 0.6).astype(np.uint8)


def test_geometry_round_trip_all_formats(tmp_path):
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    geometry = _geometry((7, 6, 5), (0.7, 1.3, 2.5), (-10.5, 20.25, 3.0), OBLIQUE)
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = write_volume(array, geometry, tmp_path / f"vol{suffix}")
        image = read_volume(path)
        back = geometry_of(image)
        assert back["size"] == geometry["size"]
        for key in ("spacing", "origin", "direction"):
            np.testing.assert_allclose(back[key], geometry[key], atol=1e-5, err_msg=f"{suffix} {key}")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)


def test_nibabel_ras_and_simpleitk_lps_agree(tmp_path):
    data = np.random.default_rng(1).integers(0, 1000, size=(6, 7, 8)).astype(np.int16)  # nibabel (i, j, k)
    affine = np.array([[0.0, 0.0, -3.0, 40.0], [2.0, 0.0, 0.0, -12.0], [0.0, -2.5, 0.0, 7.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii.gz")
    image = read_volume(tmp_path / "ras.nii.gz")
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    for i, j, k in [(0, 0, 0), (5, 6, 7), (2, 3, 4), (1, 6, 2)]:
        ras = affine @ np.array([i, j, k, 1.0])
        lps = (-ras[0], -ras[1], ras[2])
        index = image.TransformPhysicalPointToIndex(lps)
        assert index == (i, j, k)
        assert array[index[2], index[1], index[0]] == data[i, j, k]


def test_canonical_transform_inverts_and_reaches_lps():
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    axes, flips = canonical_transform(OBLIQUE)
    canonical = to_canonical(array, axes, flips)
    # OBLIQUE: array axis 2 (i) → y flipped, axis 1 (j) → z flipped, axis 0 (k) → x
    assert axes == [1, 2, 0] and flips == [True, True, False]
    assert canonical.shape == (3, 4, 2)
    np.testing.assert_array_equal(from_canonical(canonical, axes, flips), array)


def test_same_anatomy_in_lsa_2x2x3_gives_same_axial_slices(tmp_path):
    image, label = _head()
    lps = sitk.GetImageFromArray(image)
    lps.SetSpacing((2.0, 2.0, 3.0))
    lps.SetOrigin((-15.0, -19.0, -16.5))
    lps_label = sitk.GetImageFromArray(label)
    lps_label.CopyInformation(lps)
    lsa, lsa_label = sitk.DICOMOrient(lps, "LSA"), sitk.DICOMOrient(lps_label, "LSA")
    assert sitk.GetArrayFromImage(lsa).shape != image.shape  # really another voxel order
    sitk.WriteImage(lps, str(tmp_path / "lps.nii.gz"))
    sitk.WriteImage(lps_label, str(tmp_path / "lps_label.nii.gz"))
    sitk.WriteImage(lsa, str(tmp_path / "lsa.nii.gz"))
    sitk.WriteImage(lsa_label, str(tmp_path / "lsa_label.nii.gz"))
    prep = Preprocessing(image_size=64)
    a = VolumeSlices(tmp_path / "lps.nii.gz", prep, "MR", tmp_path / "lps_label.nii.gz")
    b = VolumeSlices(tmp_path / "lsa.nii.gz", prep, "MR", tmp_path / "lsa_label.nii.gz")
    assert len(a) == len(b) == 12
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    # slices keep the physical aspect ratio: 20 x 16 pixels of 2 mm → 64 x 51 px of content
    assert b.mapping.inplane.resized == (64, 51)
    # predictions go back in each file's own voxel order
    np.testing.assert_array_equal(b.to_volume(b.labels), sitk.GetArrayFromImage(lsa_label))
    np.testing.assert_array_equal(a.to_volume(a.labels), label)


def test_labels_to_slices_and_back_is_exact_when_upsampling(tmp_path):
    image, label = _head((9, 30, 22))
    label = label * np.random.default_rng(2).integers(1, 4, size=label.shape).astype(np.uint8)
    geometry = _geometry((22, 30, 9), (0.9, 1.7, 2.0), (3.0, -4.0, 5.0), OBLIQUE)
    write_volume(image, geometry, tmp_path / "img.nii.gz")
    write_volume(label, geometry, tmp_path / "lab.nii.gz")
    for plane in ("axial", "coronal", "sagittal"):
        volume = VolumeSlices(
            tmp_path / "img.nii.gz", Preprocessing(image_size=96, plane=plane), "MR", tmp_path / "lab.nii.gz"
        )
        np.testing.assert_array_equal(volume.to_volume(volume.labels), label, err_msg=plane)
        # one-hot scores take the same way back (resized, then argmax)
        scores = torch.nn.functional.one_hot(torch.from_numpy(volume.labels), 4).permute(0, 3, 1, 2).float()
        assert (volume.to_volume(scores) == label).mean() > 0.97


def test_spacing_mode_crops_maps_back_and_warns(tmp_path, capsys):
    image, label = _head((4, 40, 40))
    write_volume(image, _geometry((40, 40, 4)), tmp_path / "img.nii.gz")
    write_volume(label, _geometry((40, 40, 4)), tmp_path / "lab.nii.gz")
    volume = VolumeSlices(
        tmp_path / "img.nii.gz", Preprocessing(image_size=32, spacing=0.5), "MR", tmp_path / "lab.nii.gz"
    )
    assert volume.mapping.inplane.resized == (80, 80) and volume.mapping.inplane.offset == (-24, -24)
    back = volume.to_volume(volume.labels)
    inner = (slice(None), slice(12, 28), slice(12, 28))  # the part of the slice that fitted in 32 px
    np.testing.assert_array_equal(back[inner], label[inner])
    assert back[:, :12].sum() == 0  # cropped away → background
    warning = capsys.readouterr().err
    assert "img.nii.gz" in warning and "cropped" in warning and "covers 16 mm" in warning


def test_write_keeps_input_geometry_and_probabilities(tmp_path):
    image, label = _head((6, 10, 8))
    geometry = _geometry((8, 10, 6), (1.1, 0.9, 2.2), (1.0, 2.0, 3.0), OBLIQUE)
    write_volume(image, geometry, tmp_path / "img.nrrd")
    write_volume(label, geometry, tmp_path / "lab.nrrd")
    volume = VolumeSlices(tmp_path / "img.nrrd", Preprocessing(image_size=32), "MR", tmp_path / "lab.nrrd")
    out = volume.write(volume.to_volume(volume.labels), tmp_path / "pred.nii.gz")
    written = sitk.ReadImage(str(out))
    reference = sitk.ReadImage(str(tmp_path / "img.nrrd"))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), label)
    scores = torch.nn.functional.one_hot(torch.from_numpy(volume.labels), 2).permute(0, 3, 1, 2).float()
    probabilities = sitk.ReadImage(str(volume.save_probabilities(scores, tmp_path / "prob.nii.gz")))
    assert probabilities.GetSize() == reference.GetSize() + (2,)
    np.testing.assert_allclose(probabilities.GetOrigin()[:3], reference.GetOrigin(), atol=1e-6)


def test_inplane_fit_keeps_physical_aspect():
    fit = InPlane.fit((100, 50), (1.0, 3.0), 300, None)  # 100 mm x 150 mm
    assert fit.resized == (200, 300) and fit.offset == (50, 0)
