"""Intensity normalisation and SAM's input normalisation."""

import nibabel as nib
import numpy as np
import pytest
import torch

from samadapt.data import Preprocessing, VolumeSlices, to_sam_input
from samadapt.data.normalise import apply_window, foreground_mask, normalise, parse_window, percentile_scale
from samadapt.errors import UserError


def test_percentiles_of_a_known_array():
    volume = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)  # values 1..1000
    out = percentile_scale(volume, np.ones(volume.shape, bool))
    low, high = np.percentile(volume, [0.5, 99.5])  # 5.995 and 995.005
    assert out.min() == 0.0 and out.max() == 1.0
    assert (out == 0).sum() == 5 and (out == 1).sum() == 5  # 1..5 and 996..1000 clipped
    np.testing.assert_allclose(out.ravel()[500], (501 - low) / (high - low), rtol=1e-6)


def test_nonzero_and_otsu_foreground():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:15, 5:15, 5:15] = 200.0
    volume[9:11, 9:11, 9:11] = 20.0  # dark "ventricle" inside the head
    volume += 10.0  # non-zero background (as in the MNI152 T1)
    assert foreground_mask(volume, "nonzero").all()
    otsu = foreground_mask(volume, "otsu")
    assert otsu[9, 9, 9] and otsu[5:15, 5:15, 5:15].all() and otsu.sum() == 1000  # holes filled, background out
    out = normalise(volume, "MR")
    assert out[0, 0, 0] == 0.0 and out[7, 7, 7] == 1.0


def test_ct_windows_and_presets():
    assert parse_window("soft_tissue") == (400.0, 40.0)
    assert parse_window("1500,-600") == (1500.0, -600.0)
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32)
    np.testing.assert_allclose(apply_window(hu, "soft_tissue"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalise(hu, "CT"), [0, 0, 0.5, 1, 1])
    with pytest.raises(UserError, match="window='abc'"):
        parse_window("abc")


def test_ct_rescale_slope_and_intercept_are_honoured(tmp_path):
    stored = np.full((8, 8, 4), 1064, np.int16)  # stored value; HU = 1 * 1064 - 1024 = 40
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    volume = VolumeSlices(tmp_path / "ct.nii.gz", Preprocessing(image_size=16), "CT")
    content = volume.images[:, 4:12, 4:12]  # HU 40 = the soft-tissue window level → 0.5
    np.testing.assert_allclose(content, 0.5, atol=1e-6)


def test_to_sam_input_uses_sam_pixel_statistics():
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    out = to_sam_input(x)
    assert out.shape == (1, 3, 1, 2)
    np.testing.assert_allclose(out[0, :, 0, 0], [-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375], rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0, 1], (255 - 123.675) / 58.395, rtol=1e-6)


def test_preprocessing_key_is_stable_and_sensitive():
    assert Preprocessing().key() == Preprocessing().key()
    assert Preprocessing().key() != Preprocessing(window="lung").key()
    assert Preprocessing(plane="all").planes == ("axial", "coronal", "sagittal")
