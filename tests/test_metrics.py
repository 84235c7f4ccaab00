"""Per-case metrics on hand-made volumes whose answers are computed by hand (see each test)."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from samadapt.metrics import case_metrics

SHAPE = (14, 10, 10)


def cube(z0: int, y0: int = 2, x0: int = 2, size: int = 6, shape=SHAPE, value: int = 1) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.int16)
    volume[z0:z0 + size, y0:y0 + size, x0:x0 + size] = value
    return volume


@pytest.mark.parametrize("offset", [1, 2])
def test_hd95_is_in_mm_along_an_anisotropic_axis(offset):
    # Two 6^3 cubes, the prediction shifted by `offset` voxels along z. The farthest surface voxels are
    # the prediction's top face (36 of 152 surface voxels, > 5%) and the reference's bottom face, each
    # exactly `offset` z-steps from the other surface, so HD95 = offset x z-spacing.
    ref, pred = cube(3), cube(3 + offset)
    in_mm = case_metrics(pred, ref, spacing=(3.0, 1.0, 1.0), labels=[1])[1]
    in_voxels = case_metrics(pred, ref, spacing=(1.0, 1.0, 1.0), labels=[1])[1]
    assert in_mm["HD95"] == pytest.approx(3.0 * offset)
    assert in_voxels["HD95"] == pytest.approx(1.0 * offset)


def test_dice_iou_and_nsd_of_shifted_cubes_by_hand():
    # Shift by one 3-mm z-step: overlap 6*6*5 = 180 of 216 voxels each.
    ref, pred = cube(3), cube(4)
    scores = case_metrics(pred, ref, spacing=(3.0, 1.0, 1.0), labels=[1], nsd_tolerances_mm=2.0)[1]
    assert scores["Dice"] == pytest.approx(2 * 180 / (216 + 216))
    assert scores["IoU"] == pytest.approx(180 / (216 + 216 - 180))
    assert (scores["n_ref"], scores["n_pred"]) == (216, 216)
    assert (scores["TP"], scores["FP"], scores["FN"], scores["TN"]) == (180, 36, 36, 1400 - 252)
    # Each cube has 6^3 - 4^3 = 152 surface voxels; only the 36 of the non-overlapping face are 3 mm from
    # the other surface, all others are within 2 mm (shared side walls: 0 mm; inner faces: <= 2 mm to a
    # side wall). NSD = (116 + 116) / (152 + 152); a 3-mm tolerance accepts every voxel.
    assert scores["NSD_2mm"] == pytest.approx(116 / 152)
    wide = case_metrics(pred, ref, spacing=(3.0, 1.0, 1.0), labels=[1], nsd_tolerances_mm=3.0)[1]
    assert wide["NSD_3mm"] == pytest.approx(1.0)  # a voxel exactly at the tolerance counts (<=)
    both = case_metrics(pred, ref, spacing=(3.0, 1.0, 1.0), labels=[1], nsd_tolerances_mm="2,3")[1]
    assert (both["NSD_2mm"], both["NSD_3mm"]) == (scores["NSD_2mm"], wide["NSD_3mm"])


def test_partial_overlap_and_exact_match_in_one_multilabel_volume():
    ref = cube(1, 1, 1, size=4) + cube(8, 1, 1, size=4, value=2)
    pred = cube(1, 1, 1, size=4) + cube(8, 1, 3, size=4, value=2)  # label 2 shifted 2 voxels along x
    scores = case_metrics(pred, ref, spacing=(2.0, 0.5, 0.5), labels=[1, 2])
    assert scores[1]["Dice"] == pytest.approx(1.0)
    assert scores[1]["HD95"] == pytest.approx(0.0)
    assert scores[1]["NSD_1mm"] == scores[1]["NSD_2mm"] == pytest.approx(1.0)
    # label 2: 4*4*4 = 64 voxels each, overlap 4*4*2 = 32.
    assert scores[2]["Dice"] == pytest.approx(2 * 32 / 128)
    assert scores[2]["IoU"] == pytest.approx(32 / 96)
    assert (scores[2]["n_ref"], scores[2]["n_pred"]) == (64, 64)


def test_false_positive_only_scores_zero_and_the_hd95_penalty():
    ref, pred = np.zeros(SHAPE, dtype=np.int16), cube(3)
    scores = case_metrics(pred, ref, spacing=(1.0, 1.0, 1.0), labels=[1])[1]
    assert (scores["Dice"], scores["IoU"], scores["NSD_1mm"], scores["NSD_2mm"]) == (0.0, 0.0, 0.0, 0.0)
    assert scores["HD95"] == pytest.approx(math.sqrt(14 ** 2 + 10 ** 2 + 10 ** 2))  # the image diagonal
    assert (scores["n_ref"], scores["n_pred"], scores["FP"]) == (0, 216, 216)
    unpenalised = case_metrics(pred, ref, spacing=(1.0, 1.0, 1.0), labels=[1], empty_penalty=False)[1]
    assert (unpenalised["Dice"], unpenalised["IoU"]) == (0.0, 0.0)
    assert math.isnan(unpenalised["HD95"]) and math.isnan(unpenalised["NSD_2mm"])


def test_empty_prediction_scores_zero_and_the_hd95_penalty():
    ref, pred = cube(3), np.zeros(SHAPE, dtype=np.int16)
    scores = case_metrics(pred, ref, spacing=(1.0, 1.0, 1.0), labels=[1])[1]
    assert (scores["Dice"], scores["IoU"], scores["NSD_1mm"], scores["NSD_2mm"]) == (0.0, 0.0, 0.0, 0.0)
    assert scores["HD95"] == pytest.approx(math.sqrt(14 ** 2 + 10 ** 2 + 10 ** 2))
    assert (scores["n_ref"], scores["n_pred"], scores["FN"]) == (216, 0, 216)


def test_label_absent_from_both_is_nan_for_every_score():
    ref = pred = cube(3)
    scores = case_metrics(pred, ref, spacing=(1.0, 1.0, 1.0), labels=[1, 2])
    assert all(math.isnan(scores[2][name]) for name in ("Dice", "IoU", "NSD_1mm", "NSD_2mm", "HD95"))
    assert (scores[2]["n_ref"], scores[2]["n_pred"]) == (0, 0)
    assert scores[1]["Dice"] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_bounding_box_crop_and_shared_pass_match_full_volume_monai():
    # Irregular blobs touching the volume border, anisotropic spacing: the cropped one-pass computation must
    # equal MONAI (an independent implementation) on the whole volume.
    rng = np.random.default_rng(7)
    z, y, x = np.ogrid[:20, :24, :18]
    ref = ((z - 4) / 6.0) ** 2 + ((y - 2) / 9.0) ** 2 + ((x - 9) / 7.0) ** 2 <= 1
    pred = ((z - 5) / 7.0) ** 2 + ((y - 3) / 8.0) ** 2 + ((x - 8) / 7.0) ** 2 <= 1
    pred = pred ^ (rng.random(pred.shape) < 0.01)
    spacing = (2.5, 0.8, 1.2)
    ours = case_metrics(pred.astype(np.int16), ref.astype(np.int16), spacing, labels=[1], nsd_tolerances_mm=1.5)[1]
    y_pred, y_ref = torch.from_numpy(pred).float()[None, None], torch.from_numpy(ref).float()[None, None]
    assert ours["Dice"] == pytest.approx(compute_dice(y_pred, y_ref).item())
    assert ours["NSD_1.5mm"] == pytest.approx(compute_surface_dice(y_pred, y_ref, [1.5], include_background=True,
                                                             spacing=spacing).item())
    assert ours["HD95"] == pytest.approx(compute_hausdorff_distance(y_pred, y_ref, include_background=True,
                                                                    percentile=95, spacing=spacing).item())


def test_mismatched_shapes_or_spacing_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(cube(3), cube(3, shape=(14, 10, 11)), (1.0, 1.0, 1.0), [1])
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(cube(3), cube(3), (1.0, 1.0), [1])
    with pytest.raises(ValueError, match="finite"):
        case_metrics(cube(3), cube(3), (1.0, 1.0, 1.0), [1], nsd_tolerances_mm="1,nan")
