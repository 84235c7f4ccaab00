"""The evaluation rules (issue 16): empty cases, penalties, nnU-Net's counts and means, HD95 / NSD definitions.

Hand-made volumes with answers worked out by hand in the comments, and a brute-force reference for HD95 and NSD
(all pairwise distances between surface voxels, surfaces found with numpy only) on small random shapes.
Spacing is (z, y, x) like the arrays; the anisotropic grid is 5 mm between slices, 0.5 x 0.5 mm in plane.
"""

import math
import re

import numpy as np
import pytest

import samadapt.metrics as metrics_module
from samadapt.config import parse_config
from samadapt.errors import UserError
from samadapt.metrics import case_metrics, image_diagonal_mm
from samadapt.report import summarize

ANISO = (5.0, 0.5, 0.5)
SHAPE = (8, 12, 10)
DIAGONAL = math.sqrt((8 * 5.0) ** 2 + (12 * 0.5) ** 2 + (10 * 0.5) ** 2)  # extent 40 x 6 x 5 mm
SURFACE_SCORES = ("NSD_1mm", "NSD_2mm", "HD95")


def volume(*voxels, shape=SHAPE, value=1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int16)
    for voxel in voxels:
        out[voxel] = value
    return out


def box(z, y, x, shape=SHAPE, value=1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int16)
    out[z, y, x] = value
    return out


def case(name, metrics):
    return {"reference_file": f"/r/{name}.nii.gz", "prediction_file": f"/p/{name}.nii.gz", "metrics": metrics}


# --- empty cases -----------------------------------------------------------------------------------------------

def test_image_diagonal_is_the_physical_extent_of_the_volume():
    assert image_diagonal_mm(SHAPE, ANISO) == pytest.approx(DIAGONAL, abs=1e-12)
    assert image_diagonal_mm((155, 240, 240), (1.0, 1.0, 1.0)) == pytest.approx(373.1287, abs=1e-4)  # BraTS


def test_a_miss_scores_dice_zero_and_the_diagonal_penalty():
    ref, pred = box(slice(2, 5), slice(3, 7), slice(3, 7)), np.zeros(SHAPE, dtype=np.int16)
    scores = case_metrics(pred, ref, ANISO, [1])[1]
    assert (scores["Dice"], scores["IoU"]) == (0.0, 0.0)
    assert scores["HD95"] == pytest.approx(DIAGONAL, abs=1e-12)
    assert (scores["NSD_1mm"], scores["NSD_2mm"]) == (0.0, 0.0)
    assert {k: scores[k] for k in ("TP", "FP", "FN", "TN", "n_pred", "n_ref")} == {
        "TP": 0, "FP": 0, "FN": 48, "TN": 960 - 48, "n_pred": 0, "n_ref": 48}


def test_a_false_positive_on_an_empty_reference_scores_dice_zero_and_the_penalty():
    ref, pred = np.zeros(SHAPE, dtype=np.int16), volume((0, 0, 0), (7, 11, 9))
    scores = case_metrics(pred, ref, ANISO, [1])[1]
    assert (scores["Dice"], scores["IoU"]) == (0.0, 0.0)
    assert scores["HD95"] == pytest.approx(DIAGONAL, abs=1e-12)
    assert (scores["NSD_1mm"], scores["NSD_2mm"]) == (0.0, 0.0)
    assert (scores["TP"], scores["FP"], scores["FN"], scores["n_pred"], scores["n_ref"]) == (0, 2, 0, 2, 0)


def test_without_the_penalty_a_miss_and_a_false_positive_have_no_surface_scores():
    ref = box(slice(2, 5), slice(3, 7), slice(3, 7))
    for pred, truth in ((np.zeros(SHAPE, dtype=np.int16), ref), (ref, np.zeros(SHAPE, dtype=np.int16))):
        scores = case_metrics(pred, truth, ANISO, [1], empty_penalty=False)[1]
        assert (scores["Dice"], scores["IoU"]) == (0.0, 0.0)  # Dice stays 0: only HD95 / NSD are undefined
        assert all(math.isnan(scores[name]) for name in SURFACE_SCORES)


def test_both_empty_is_nan_for_every_score_with_or_without_the_penalty():
    empty = np.zeros(SHAPE, dtype=np.int16)
    for penalty in (True, False):
        scores = case_metrics(empty, empty, ANISO, [1], empty_penalty=penalty)[1]
        assert all(math.isnan(scores[name]) for name in ("Dice", "IoU", *SURFACE_SCORES))
        assert (scores["TP"], scores["FP"], scores["FN"], scores["TN"]) == (0, 0, 0, 960)


# --- hand-computed surface scores ----------------------------------------------------------------------------

def test_one_voxel_objects():
    same = case_metrics(volume((4, 5, 5)), volume((4, 5, 5)), ANISO, [1])[1]
    assert (same["Dice"], same["HD95"], same["NSD_1mm"]) == (1.0, 0.0, 1.0)
    # One slice (5 mm) and two in-plane rows (1 mm) apart: sqrt(5^2 + 1^2); beyond both tolerances.
    apart = case_metrics(volume((4, 5, 5)), volume((3, 7, 5)), ANISO, [1])[1]
    assert apart["HD95"] == pytest.approx(math.sqrt(26.0), abs=1e-12)
    assert (apart["Dice"], apart["NSD_1mm"], apart["NSD_2mm"]) == (0.0, 0.0, 0.0)
    # Exactly 1 mm apart in plane (two 0.5-mm columns): at the 1-mm tolerance it counts — the tie rule is "<=".
    tie = case_metrics(volume((4, 5, 5)), volume((4, 5, 7)), ANISO, [1])[1]
    assert (tie["HD95"], tie["NSD_1mm"], tie["NSD_2mm"]) == (1.0, 1.0, 1.0)
    just_over = case_metrics(volume((4, 5, 5)), volume((4, 5, 7)), ANISO, [1], nsd_tolerances_mm=0.999999)[1]
    assert just_over["NSD_0.999999mm"] == 0.0


def test_one_voxel_inside_a_cube_on_the_anisotropic_grid():
    # Reference: a 3x3x3 cube, surface = its 26 outer voxels. Prediction: the centre voxel (its own surface).
    # pred -> ref: 0.5 mm (an in-plane neighbour). ref -> pred: same slice 4 x 0.5 and 4 x sqrt(0.5) mm; the
    # slices above/below 2 x 5, 8 x sqrt(25.25), 8 x sqrt(25.5) mm. Sorted, the 95th percentile sits at index
    # 0.95 * 25 = 23.75, between two sqrt(25.5): HD95 = sqrt(25.5). Within 1 or 2 mm: the centre and 8 of 26.
    ref = box(slice(3, 6), slice(4, 7), slice(4, 7))
    pred = volume((4, 5, 5))
    scores = case_metrics(pred, ref, ANISO, [1])[1]
    assert scores["HD95"] == pytest.approx(math.sqrt(25.5), abs=1e-12)
    assert scores["NSD_1mm"] == pytest.approx(9 / 27, abs=1e-12)
    assert scores["NSD_2mm"] == pytest.approx(9 / 27, abs=1e-12)
    assert scores["Dice"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 26))


def test_spacing_follows_the_array_axes():
    # A 4x4x4 box shifted by one voxel along z (5 mm steps) or along x (0.5 mm steps).
    ref = box(slice(2, 6), slice(4, 8), slice(3, 7))
    along_z = case_metrics(np.roll(ref, 1, axis=0), ref, ANISO, [1])[1]
    along_x = case_metrics(np.roll(ref, 1, axis=2), ref, ANISO, [1])[1]
    assert along_z["HD95"] == pytest.approx(5.0, abs=1e-12)
    assert along_x["HD95"] == pytest.approx(0.5, abs=1e-12)
    # x shift: every surface voxel is within 0.5 mm of the other surface
    assert (along_x["NSD_1mm"], along_x["NSD_2mm"]) == (1.0, 1.0)


# --- nnU-Net's counts and means ------------------------------------------------------------------------------

def nnunet_counts(pred: np.ndarray, ref: np.ndarray, label: int) -> dict:
    """nnU-Net's compute_tp_fp_fn_tn and compute_metrics on one label (no ignore label)."""
    mask_ref, mask_pred = ref == label, pred == label
    tp = int(np.sum(mask_ref & mask_pred))
    fp = int(np.sum((~mask_ref) & mask_pred))
    fn = int(np.sum(mask_ref & (~mask_pred)))
    tn = int(np.sum((~mask_ref) & (~mask_pred)))
    if tp + fp + fn == 0:
        dice = iou = math.nan
    else:
        dice, iou = 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
    return {"Dice": dice, "IoU": iou, "TP": tp, "FP": fp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}


def test_counts_dice_and_iou_equal_nnunets_definitions():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, size=(6, 9, 7)).astype(np.int16)
    pred = np.where(rng.random(ref.shape) < 0.7, ref, rng.integers(0, 3, size=ref.shape)).astype(np.int16)
    pred[pred == 2] = 0  # label 2: a miss; label 3: in neither
    ours = case_metrics(pred, ref, (2.0, 0.7, 0.9), [0, 1, 2, 3])
    for label in (0, 1, 2, 3):
        expected = nnunet_counts(pred, ref, label)
        for name, value in expected.items():
            if math.isnan(value):
                assert math.isnan(ours[label][name])
            else:
                assert ours[label][name] == pytest.approx(value, abs=1e-12), (label, name)
            if name not in ("Dice", "IoU"):
                assert type(ours[label][name]) is int


def test_a_class_absent_from_some_cases_and_one_absent_from_all():
    # Class 1 in three cases, class 2 in one (both empty in the others), class 3 in none.
    spacing = (1.0, 1.0, 1.0)
    ref1 = box(slice(1, 5), slice(1, 5), slice(1, 5))
    pred_a = box(slice(1, 5), slice(1, 5), slice(1, 5))  # Dice 1
    pred_b = box(slice(1, 5), slice(1, 5), slice(1, 3))  # Dice 2*32 / (32 + 64) = 2/3
    pred_c = box(slice(1, 5), slice(1, 5), slice(1, 2))  # Dice 2*16 / (16 + 64) = 0.4
    ref2, pred2 = box(6, slice(8, 10), slice(6, 9), value=2), box(6, slice(8, 10), slice(6, 8), value=2)  # 0.8
    cases = [case("a", case_metrics(pred_a + pred2, ref1 + ref2, spacing, [1, 2, 3])),
             case("b", case_metrics(pred_b, ref1, spacing, [1, 2, 3])),
             case("c", case_metrics(pred_c, ref1, spacing, [1, 2, 3]))]
    summary = summarize(cases)
    mean = summary["mean"]
    assert mean["1"]["Dice"] == pytest.approx((1 + 2 / 3 + 0.4) / 3)
    assert mean["2"]["Dice"] == pytest.approx(0.8)
    assert (mean["2"]["n_both_empty"], mean["2"]["n_nan"]["Dice"], mean["2"]["n_cases"]) == (2, 2, 3)
    assert math.isnan(mean["3"]["Dice"]) and mean["3"]["n_both_empty"] == 3
    # nnU-Net: foreground_mean = np.mean of the class means, so a class absent from every case makes it NaN
    assert all(math.isnan(summary["foreground_mean"][name]) for name in ("Dice", "IoU", *SURFACE_SCORES))
    # Without class 3: the mean of the two class means (not pooled over the four defined values)
    summary = summarize([{**c, "metrics": {k: v for k, v in c["metrics"].items() if k != 3}} for c in cases])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((1 + 2 / 3 + 0.4) / 3 + 0.8) / 2)
    assert summary["foreground_mean"]["Dice"] != pytest.approx((1 + 2 / 3 + 0.4 + 0.8) / 4)


def test_the_penalty_keeps_misses_in_the_means_and_the_variant_excludes_and_counts_them():
    # Two cases: a good segmentation (HD95 0.5 mm) and a miss. With the penalty the miss pulls the HD95 mean up;
    # without it the mean is the good case alone and n_nan says one case was left out.
    ref = box(slice(2, 6), slice(4, 8), slice(3, 7))
    good, missed = np.roll(ref, 1, axis=2), np.zeros(SHAPE, dtype=np.int16)
    for penalty, hd95, nsd, nan in ((True, (0.5 + DIAGONAL) / 2, 0.5, 0), (False, 0.5, 1.0, 1)):
        cases = [case(name, case_metrics(pred, ref, ANISO, [1], empty_penalty=penalty))
                 for name, pred in (("good", good), ("missed", missed))]
        mean = summarize(cases, empty_penalty=penalty)["mean"]["1"]
        assert mean["HD95"] == pytest.approx(hd95, abs=1e-12) and mean["NSD_2mm"] == pytest.approx(nsd)
        assert mean["Dice"] == pytest.approx(case_metrics(good, ref, ANISO, [1])[1]["Dice"] / 2)  # Dice 0 counts
        assert mean["n_nan"]["HD95"] == nan and mean["n_nan"]["Dice"] == 0
        assert (mean["n_miss"], mean["n_false_positive"], mean["n_both_empty"]) == (1, 0, 0)


def test_summary_names_every_rule_in_one_line():
    rules = summarize([], nsd_tolerances_mm="1,2")["rules"]
    assert all(isinstance(line, str) and "\n" not in line and line for line in rules.values())
    assert "max(95th percentile" in rules["hd95"] and "linear" in rules["hd95"]
    assert "<=" in rules["nsd"] and "float64" in rules["nsd"] and "1, 2" in rules["nsd"]
    assert "float64" in rules["surface_distance"] and "spacing" in rules["surface_distance"]
    assert "image diagonal" in rules["miss"] and "image diagonal" in rules["false_positive"]
    assert "NaN" in rules["both_empty"] and "NaN" in rules["mean"]
    assert all(name in rules["counts"] for name in ("TP", "FP", "FN", "TN", "n_pred", "n_ref"))
    variant = summarize([], empty_penalty=False)["rules"]
    assert "empty_penalty=false" in variant["miss"] and "image diagonal" not in variant["miss"]


# --- HD95 and NSD against brute force ------------------------------------------------------------------------

def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background (or out-of-volume) face neighbour, with numpy slicing only."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            shifted = list(inner)
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            interior &= padded[tuple(shifted)]
    return mask & ~interior


def brute_force(pred: np.ndarray, ref: np.ndarray, spacing, tolerances) -> dict:
    a = np.argwhere(brute_surface(pred)).astype(np.float64)
    b = np.argwhere(brute_surface(ref)).astype(np.float64)
    pairwise = np.sqrt((((a[:, None, :] - b[None, :, :]) * np.asarray(spacing)) ** 2).sum(axis=-1))
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    out = {"HD95": max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))}
    for t in tolerances:
        out[f"NSD_{t:g}mm"] = ((a_to_b <= t).sum() + (b_to_a <= t).sum()) / (a.shape[0] + b.shape[0])
    return out


def random_shape(rng, shape) -> np.ndarray:
    """A blob (random ellipsoid) with a few voxels flipped: holes, specks, irregular surfaces."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [rng.uniform(0.2, 0.8) * n for n in shape]
    radii = [rng.uniform(0.15, 0.45) * n for n in shape]
    blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1
    return blob ^ (rng.random(shape) < 0.03)


@pytest.mark.parametrize("spacing, shape", [(ANISO, (6, 16, 14)), ((2.5, 0.8, 1.2), (7, 12, 11)),
                                            ((0.5, 3.0), (20, 9)), ((1.0, 1.0, 1.0), (9, 9, 9))])
def test_hd95_and_nsd_equal_brute_force_on_random_shapes(spacing, shape):
    rng = np.random.default_rng(sum(shape))
    tolerances = (1.0, 2.0, 2.5, 3.0)  # 2.5 and 3 mm: exactly reachable (ties) on several of these grids
    for _ in range(6):
        pred, ref = random_shape(rng, shape), random_shape(rng, shape)
        if not pred.any() or not ref.any():
            continue
        ours = case_metrics(pred.astype(np.int16), ref.astype(np.int16), spacing, [1], tolerances)[1]
        expected = brute_force(pred, ref, spacing, tolerances)
        assert ours["HD95"] == pytest.approx(expected["HD95"], abs=1e-6)
        for t in tolerances:
            assert ours[f"NSD_{t:g}mm"] == pytest.approx(expected[f"NSD_{t:g}mm"], abs=1e-9)


def test_hd95_is_the_larger_one_way_percentile_not_the_pooled_one():
    # Reference: one voxel. Prediction: that voxel plus a row of 19 in-plane voxels 0.5..9.5 mm away from it.
    # ref -> pred: 0. pred -> ref: 0, 0.5, ..., 9.5 (each voxel is its own surface voxel) → 95th percentile
    # at index 0.95 * 19 = 18.05: 9.0 + 0.05 * 0.5 = 9.025. Pooled with the reference's 0 it would be 9.0.
    ref = volume((4, 5, 0), shape=(8, 12, 20))
    pred = ref.copy()
    pred[4, 5, :] = 1
    scores = case_metrics(pred, ref, ANISO, [1])[1]
    pooled = np.percentile(np.r_[np.arange(20) * 0.5, 0.0], 95)
    assert scores["HD95"] == pytest.approx(9.025, abs=1e-12) and pooled == pytest.approx(9.0)


def test_hd95_and_nsd_share_one_pass_per_case_and_class(monkeypatch):
    calls = {"surfaces": 0, "surface_distances": 0}
    for name in calls:
        original = getattr(metrics_module, name)

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(metrics_module, name, counted)
    ref = box(slice(2, 6), slice(4, 8), slice(3, 7)) + box(slice(1, 3), slice(0, 3), slice(0, 3), value=2)
    pred = np.roll(ref, 1, axis=1)
    case_metrics(pred, ref, ANISO, [1, 2, 3], nsd_tolerances_mm=(0.5, 1, 2))  # label 3 in neither: no surface
    assert calls == {"surfaces": 2 * 2, "surface_distances": 2}


# --- evaluate's keys -----------------------------------------------------------------------------------------

def test_evaluate_keys_for_the_rules():
    from samadapt.evaluate.config import EvaluateConfig

    required = ["data=m.jsonl", "model=m", "out=o"]
    config = parse_config(EvaluateConfig, None, required)
    assert (config.nsd_tolerances, config.empty_penalty) == ((1.0, 2.0), True)
    config = parse_config(EvaluateConfig, None, [*required, "nsd_tolerances_mm=1, 2.5,1", "empty_penalty=false"])
    assert (config.nsd_tolerances, config.nsd_tolerances_mm, config.empty_penalty) == ((1.0, 2.5), "1,2.5", False)
    for value, says in (("nan", "nsd_tolerances_mm=nan: must be a finite number"), ("0", "must be in (0, 1000]"),
                        ("1,x", "'x' is not a number"), ("", "no tolerance")):
        with pytest.raises(UserError, match=("^" if value == "nan" else "") + re.escape(says)):
            parse_config(EvaluateConfig, None, [*required, f"nsd_tolerances_mm={value}"])
    with pytest.raises(UserError, match="did you mean nsd_tolerances_mm"):
        parse_config(EvaluateConfig, None, [*required, "nsd_tolerance_mm=2"])
