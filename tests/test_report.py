"""Reports: summary means, NaN and empty-case counts, object-size strata, per-case CSV, overlay PNG (comparisons of
runs: test_compare.py)."""

import csv
import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from samadapt.io import write_json
from samadapt.metrics import SIZE_STRATA, case_metrics, size_stratum
from samadapt.report import overlay_slices, summarize, write_overlay_png, write_per_case_csv

NAN = math.nan


SCORES = ("Dice", "IoU", "NSD_1mm", "NSD_2mm", "HD95")
DIAGONAL = 300.0  # the HD95 penalty of a miss or a false positive in these hand-set cases


def fake_case(name, label1, label2):
    """A case with hand-set scores (Dice, IoU, NSD_1mm, NSD_2mm, HD95, TP, FP, FN) for labels 1 and 2 (int
    keys, as case_metrics returns them); TN, n_pred and n_ref follow from the counts in a 1000-voxel volume."""
    def metrics(values):
        scores = dict(zip(SCORES, values[:5]))
        tp, fp, fn = values[5:]
        return scores | {"TP": tp, "FP": fp, "FN": fn, "TN": 1000 - tp - fp - fn, "n_pred": tp + fp, "n_ref": tp + fn}

    return {"reference_file": f"labels/{name}.nii.gz", "prediction_file": f"predictions/{name}.nii.gz",
            "metrics": {1: metrics(label1), 2: metrics(label2)}}


CASES = [
    fake_case("a", (0.9, 0.8, 0.9, 0.95, 2.0, 100, 10, 0), (0.5, 0.4, 0.5, 0.6, 5.0, 10, 2, 0)),
    fake_case("b", (0.7, 0.6, 0.7, 0.75, 4.0, 80, 0, 10), (NAN, NAN, NAN, NAN, NAN, 0, 0, 0)),      # label 2 in neither
    fake_case("c", (0.0, 0.0, 0.0, 0.0, DIAGONAL, 0, 0, 50), (0.0, 0.0, 0.0, 0.0, DIAGONAL, 0, 7, 0)),  # miss / FP
]


def test_summary_means_ignore_nan_and_count_it():
    summary = summarize(CASES, nsd_tolerances_mm=(1.0, 2.0))
    assert list(summary["mean"]) == ["1", "2"]
    for label in (1, 2):
        for metric in (*SCORES, "TP", "FP", "FN", "TN", "n_pred", "n_ref"):
            column = np.array([case["metrics"][label][metric] for case in CASES], dtype=float)
            assert summary["mean"][str(label)][metric] == pytest.approx(np.nanmean(column))
            if metric in SCORES:
                assert summary["mean"][str(label)]["n_nan"][metric] == int(np.isnan(column).sum())
    # the penalised miss and false positive are in the HD95 mean; only both-empty is left out
    assert summary["mean"]["2"]["HD95"] == pytest.approx((5.0 + DIAGONAL) / 2)
    assert summary["mean"]["2"]["n_nan"] == {name: 1 for name in SCORES}
    counts = [{name: summary["mean"][label][name] for name in ("n_cases", "n_miss", "n_false_positive",
                                                                 "n_both_empty")} for label in ("1", "2")]
    assert counts == [{"n_cases": 3, "n_miss": 1, "n_false_positive": 0, "n_both_empty": 0},
                      {"n_cases": 3, "n_miss": 0, "n_false_positive": 1, "n_both_empty": 1}]
    for metric in SCORES:
        assert summary["foreground_mean"][metric] == pytest.approx(
            (summary["mean"]["1"][metric] + summary["mean"]["2"][metric]) / 2)
    assert [case["reference_file"] for case in summary["metric_per_case"]] == [c["reference_file"] for c in CASES]
    assert set(summary["metric_per_case"][0]["metrics"]) == {"1", "2"}
    assert summary["nsd_tolerances_mm"] == [1.0, 2.0] and summary["empty_penalty"] is True
    assert {"hd95", "nsd", "miss", "false_positive", "both_empty", "counts", "mean"} <= set(summary["rules"])


def test_summary_json_has_null_for_nan_and_rereads_to_the_same_means(tmp_path):
    summary = summarize(CASES)
    write_json(tmp_path / "summary.json", summary)
    text = (tmp_path / "summary.json").read_text(encoding="utf-8")
    def refuse(constant):
        raise AssertionError(f"{constant} in summary.json: not JSON")

    reread = json.loads(text, parse_constant=refuse)  # NaN is written as null
    assert reread["metric_per_case"][1]["metrics"]["2"]["Dice"] is None
    again = summarize(reread["metric_per_case"])
    assert again["mean"] == reread["mean"] and again["rules"] == reread["rules"]


def test_summary_excludes_background_from_foreground_mean():
    ref = np.zeros((6, 8, 8), dtype=np.int16)
    ref[1:5, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[1:5, 2:6, 3:7] = 1
    metrics = case_metrics(pred, ref, (2.0, 1.0, 1.0), labels=[0, 1])
    summary = summarize([{"reference_file": "r.nii.gz", "prediction_file": "p.nii.gz", "metrics": metrics}])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(summary["mean"]["1"]["Dice"])
    assert summary["foreground_mean"]["Dice"] != pytest.approx(summary["mean"]["0"]["Dice"])


def test_per_case_csv_has_units_tolerances_counts_and_empty_cells_for_nan(tmp_path):
    path = write_per_case_csv(summarize(CASES, nsd_tolerances_mm="1,2"), tmp_path / "per_case.csv",
                              label_names={1: "brain", 2: "lesion"})
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["case", "reference_file", "prediction_file", "label", "label_name", "dice", "iou",
                             "nsd_1mm", "nsd_2mm", "hd95_mm", "TP", "FP", "FN", "TN", "n_pred", "n_ref",
                             "empty_case", "ref_fraction", "size_stratum"]
    assert len(rows) == len(CASES) * 2
    by_key = {(row["case"], row["label"]): row for row in rows}
    assert by_key[("a", "1")]["label_name"] == "brain"
    assert float(by_key[("a", "2")]["hd95_mm"]) == 5.0
    assert (float(by_key[("a", "1")]["nsd_1mm"]), float(by_key[("a", "1")]["nsd_2mm"])) == (0.9, 0.95)
    assert by_key[("b", "2")]["dice"] == "" and by_key[("b", "2")]["hd95_mm"] == ""
    assert float(by_key[("c", "1")]["hd95_mm"]) == DIAGONAL
    assert (by_key[("c", "2")]["n_pred"], by_key[("c", "2")]["FP"], by_key[("c", "2")]["TN"]) == ("7", "7", "993")
    assert [by_key[key]["empty_case"] for key in (("a", "1"), ("b", "2"), ("c", "1"), ("c", "2"))] == [
        "", "both_empty", "miss", "false_positive"]
    # 100 / 1000 voxels is large; a miss keeps its reference's stratum, an empty reference has none
    assert [(by_key[key]["ref_fraction"], by_key[key]["size_stratum"]) for key in (("a", "1"), ("c", "1"), ("c", "2"))
            ] == [("0.1", "large"), ("0.05", "large"), ("", "")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_case.csv"]  # no temp files left


def test_overlay_png_has_the_documented_size_and_both_contours(tmp_path):
    z, y, x = np.ogrid[:30, :40, :50]
    image = (x + y).astype(np.float32) * np.ones((30, 1, 1), dtype=np.float32)
    ref = ((((z - 15) / 6.0) ** 2 + ((y - 20) / 10.0) ** 2 + ((x - 25) / 12.0) ** 2) <= 1).astype(np.int16)
    pred = np.roll(ref, 3, axis=2)
    path = write_overlay_png(image, ref, pred, tmp_path / "overlays" / "case.png", "case: Dice 0.8")
    pixels = imread(path)
    assert pixels.shape[:2] == (330, 900)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert np.count_nonzero((green > 0.8) & (red < 0.3) & (blue < 0.3)) > 20  # reference contour (lime)
    assert np.count_nonzero((red > 0.8) & (green < 0.3) & (blue < 0.3)) > 20  # prediction contour (red)
    assert sorted(p.name for p in path.parent.iterdir()) == ["case.png"]


def test_overlay_slices_lie_inside_the_reference_extent():
    ref = np.zeros((40, 4, 4), dtype=np.int16)
    ref[10:21] = 1
    slices = overlay_slices(ref, np.zeros_like(ref), 3)
    assert slices == sorted(set(slices)) and all(10 < z < 20 for z in slices)
    pred = np.zeros_like(ref)
    pred[30:36] = 1
    assert all(30 < z < 35 for z in overlay_slices(np.zeros_like(ref), pred, 3))  # empty reference: use pred


def test_size_strata_of_hand_made_objects_in_the_summary_and_the_csv(tmp_path):
    # 20 x 50 x 50 = 50000 voxels: small < 50 voxels (0.1 %), medium < 500 (1 %), large from 500 on
    shape = (20, 50, 50)
    assert [name for name, _ in SIZE_STRATA] == ["small", "medium", "large"]
    assert [size_stratum(n, 50000) for n in (0, 1, 49, 50, 499, 500)] == [None, "small", "small", "medium",
                                                                             "medium", "large"]
    objects = {"one_voxel": (slice(5, 6), slice(5, 6), slice(5, 6)),       # 1 voxel: small
               "cube49": (slice(2, 3), slice(0, 7), slice(0, 7)),          # 49: small
               "cube64": (slice(2, 6), slice(10, 14), slice(10, 14)),      # 64: medium
               "slab1000": (slice(0, 10), slice(0, 10), slice(20, 30))}    # 1000: large
    cases = []
    for name, where in objects.items():
        ref = np.zeros(shape, dtype=np.int16)
        ref[where] = 1
        pred = np.roll(ref, 1, axis=2) if name != "cube49" else np.zeros_like(ref)  # cube49: a miss
        cases.append({"case_id": name, "reference_file": f"{name}.nii.gz", "prediction_file": f"p/{name}.nii.gz",
                      "metrics": case_metrics(pred, ref, (2.0, 1.0, 1.0), [1])})
    empty = np.zeros(shape, dtype=np.int16)
    cases.append({"case_id": "empty", "reference_file": "empty.nii.gz", "prediction_file": "p/empty.nii.gz",
                  "metrics": case_metrics(empty, empty, (2.0, 1.0, 1.0), [1])})  # both empty: no stratum
    summary = summarize(cases)
    strata = summary["mean"]["1"]["strata"]
    assert {name: s["n_cases"] for name, s in strata.items()} == {"small": 2, "medium": 1, "large": 1}
    dice = {case["case_id"]: case["metrics"][1]["Dice"] for case in cases}
    assert strata["small"]["Dice"] == pytest.approx((dice["one_voxel"] + 0.0) / 2)
    assert strata["medium"]["Dice"] == pytest.approx(dice["cube64"]) and dice["cube64"] == pytest.approx(0.75)
    assert strata["large"]["Dice"] == pytest.approx(0.9)  # a 10-voxel-wide slab shifted by one voxel
    assert strata["small"]["HD95"] == pytest.approx(np.mean([cases[0]["metrics"][1]["HD95"],
                                                             cases[1]["metrics"][1]["HD95"]]))
    rows = {row["case"]: row for row in csv.DictReader(write_per_case_csv(summary, tmp_path / "c.csv").open())}
    assert {name: row["size_stratum"] for name, row in rows.items()} == {
        "one_voxel": "small", "cube49": "small", "cube64": "medium", "slab1000": "large", "empty": ""}
    assert float(rows["cube64"]["ref_fraction"]) == 64 / 50000
    assert "small < 0.1 %" in summary["rules"]["size_strata"] and "medium < 1 %" in summary["rules"]["size_strata"]
