"""Reports: summary means and NaN counts, per-case CSV, overlay PNG, comparison of evaluation runs."""

import csv
import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from samadapt.errors import UserError
from samadapt.io import write_json
from samadapt.metrics import case_metrics
from samadapt.report import compare_runs, overlay_slices, summarize, write_overlay_png, write_per_case_csv

NAN = math.nan


def fake_case(name, label1, label2):
    """A case with hand-set scores (Dice, IoU, NSD, HD95, n_ref, n_pred) for labels 1 and 2 (int keys,
    as case_metrics returns them)."""
    keys = ("Dice", "IoU", "NSD", "HD95", "n_ref", "n_pred")
    return {"reference_file": f"labels/{name}.nii.gz", "prediction_file": f"predictions/{name}.nii.gz",
            "metrics": {1: dict(zip(keys, label1)), 2: dict(zip(keys, label2))}}


CASES = [
    fake_case("a", (0.9, 0.8, 0.95, 2.0, 100, 110), (0.5, 0.4, 0.6, 5.0, 10, 12)),
    fake_case("b", (0.7, 0.6, 0.75, 4.0, 90, 80), (NAN, NAN, NAN, NAN, 0, 0)),      # label 2 in neither
    fake_case("c", (0.0, 0.0, 0.0, NAN, 50, 0), (0.0, 0.0, 0.0, NAN, 0, 7)),         # empty pred / FP only
]


def test_summary_means_ignore_nan_and_count_it():
    summary = summarize(CASES, nsd_tolerance_mm=2.0)
    assert list(summary["mean"]) == ["1", "2"]
    for label in (1, 2):
        for metric in ("Dice", "IoU", "NSD", "HD95", "n_ref", "n_pred"):
            column = np.array([case["metrics"][label][metric] for case in CASES], dtype=float)
            assert summary["mean"][str(label)][metric] == pytest.approx(np.nanmean(column))
            if metric in ("Dice", "IoU", "NSD", "HD95"):
                assert summary["mean"][str(label)]["n_nan"][metric] == int(np.isnan(column).sum())
    assert summary["mean"]["2"]["n_nan"] == {"Dice": 1, "IoU": 1, "NSD": 1, "HD95": 2}
    for metric in ("Dice", "IoU", "NSD", "HD95"):
        assert summary["foreground_mean"][metric] == pytest.approx(
            (summary["mean"]["1"][metric] + summary["mean"]["2"][metric]) / 2)
    assert [case["reference_file"] for case in summary["metric_per_case"]] == [c["reference_file"] for c in CASES]
    assert set(summary["metric_per_case"][0]["metrics"]) == {"1", "2"}


def test_summary_json_has_null_for_nan_and_rereads_to_the_same_means(tmp_path):
    summary = summarize(CASES)
    write_json(tmp_path / "summary.json", summary)
    text = (tmp_path / "summary.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    reread = json.loads(text)
    assert reread["metric_per_case"][1]["metrics"]["2"]["Dice"] is None
    assert summarize(reread["metric_per_case"])["mean"] == reread["mean"]


def test_summary_excludes_background_from_foreground_mean():
    ref = np.zeros((6, 8, 8), dtype=np.int16)
    ref[1:5, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[1:5, 2:6, 3:7] = 1
    metrics = case_metrics(pred, ref, (2.0, 1.0, 1.0), labels=[0, 1])
    summary = summarize([{"reference_file": "r.nii.gz", "prediction_file": "p.nii.gz", "metrics": metrics}])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(summary["mean"]["1"]["Dice"])
    assert summary["foreground_mean"]["Dice"] != pytest.approx(summary["mean"]["0"]["Dice"])


def test_per_case_csv_has_units_tolerance_and_empty_cells_for_nan(tmp_path):
    path = write_per_case_csv(summarize(CASES, nsd_tolerance_mm=1.5), tmp_path / "per_case.csv",
                              label_names={1: "brain", 2: "lesion"})
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["case", "reference_file", "prediction_file", "label", "label_name", "dice", "iou",
                             "nsd_1.5mm", "hd95_mm", "n_ref_voxels", "n_pred_voxels"]
    assert len(rows) == len(CASES) * 2
    by_key = {(row["case"], row["label"]): row for row in rows}
    assert by_key[("a", "1")]["label_name"] == "brain"
    assert float(by_key[("a", "2")]["hd95_mm"]) == 5.0
    assert float(by_key[("a", "1")]["nsd_1.5mm"]) == 0.95
    assert by_key[("b", "2")]["dice"] == "" and by_key[("c", "1")]["hd95_mm"] == ""
    assert by_key[("c", "2")]["n_pred_voxels"] == "7"
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


def write_eval_dir(path, cases, tolerance=2.0):
    path.mkdir(parents=True)
    write_json(path / "summary.json", summarize(cases, nsd_tolerance_mm=tolerance))
    return path


def test_compare_two_runs_writes_markdown_csv_and_chart(tmp_path):
    first = write_eval_dir(tmp_path / "runs" / "lora" / "evaluate", CASES)
    second = write_eval_dir(tmp_path / "runs" / "full" / "evaluate", CASES[:1])
    markdown = compare_runs([first, second], tmp_path / "compare", label_names={"1": "brain"})
    assert (tmp_path / "compare.md").read_text(encoding="utf-8") == markdown
    lines = markdown.splitlines()
    assert lines[0] == "| run | class | cases | Dice | IoU | NSD (2 mm) | HD95 (mm) | HD95 n/a |"
    mean_1 = summarize(CASES)["mean"]["1"]
    no_hd95 = mean_1["n_nan"]["HD95"]
    assert f"| lora/evaluate | 1 (brain) | {len(CASES)} | {mean_1['Dice']:.4f} | {mean_1['IoU']:.4f} | " \
           f"{mean_1['NSD']:.4f} | {mean_1['HD95']:.2f} | {no_hd95} |" in lines
    assert "| full/evaluate | 2 | 1 | 0.5000 | 0.4000 | 0.6000 | 5.00 | 0 |" in lines
    assert sum("foreground mean" in line for line in lines) == 2
    foreground = next(line for line in lines if line.startswith("| lora/evaluate | foreground mean |"))
    assert foreground.startswith("| lora/evaluate | foreground mean | 3 |") and foreground.endswith("| 3 |")
    assert len(lines) == 2 + 2 * 3
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert list(rows[0]) == ["run", "eval_dir", "label", "label_name", "cases", "dice", "iou", "nsd_2mm", "hd95_mm",
                             "hd95_missing"]
    assert [(row["run"], row["label"]) for row in rows] == [
        ("lora/evaluate", "1"), ("lora/evaluate", "2"), ("lora/evaluate", "foreground"),
        ("full/evaluate", "1"), ("full/evaluate", "2"), ("full/evaluate", "foreground")]
    assert float(rows[4]["dice"]) == 0.5
    assert imread(tmp_path / "compare.png").shape[0] > 100


def test_compare_takes_class_names_from_the_summaries(tmp_path):
    summary = {**summarize(CASES), "label_names": {"0": "background", "1": "brain", "2": "tumour"}}
    (tmp_path / "ev").mkdir()
    write_json(tmp_path / "ev" / "summary.json", summary)
    markdown = compare_runs([tmp_path / "ev"], tmp_path / "compare")
    assert "| ev | 1 (brain) |" in markdown and "| ev | 2 (tumour) |" in markdown


def test_compare_names_and_refuses_bad_summaries(tmp_path):
    good = write_eval_dir(tmp_path / "good", CASES)
    markdown = compare_runs([good], tmp_path / "one", names=["baseline"])
    assert "| baseline | 1 |" in markdown
    with pytest.raises(UserError, match="missing_run"):
        compare_runs([good, tmp_path / "missing_run"], tmp_path / "out")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="broken_run"):
        compare_runs([good, broken], tmp_path / "out")
    other = write_eval_dir(tmp_path / "other_tolerance", CASES, tolerance=1.0)
    with pytest.raises(UserError, match="tolerance"):
        compare_runs([good, other], tmp_path / "out")
    with pytest.raises(UserError, match="one name per folder"):
        compare_runs([good], tmp_path / "out", names=["a", "b"])
