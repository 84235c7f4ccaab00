"""``samadapt evaluate predictions=DIR``: any folder of masks scored with the same rules, no model loaded.

Synthetic volumes on an anisotropic, oblique grid (written with SimpleITK, so spacing and direction are real
header fields); the expected scores come from ``case_metrics`` / ``summarize`` on the same arrays in-process.
"""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import assert_one_line_error, record_of, run_cli
from samadapt.data.manifest import Case
from samadapt.errors import UserError
from samadapt.evaluate.folder import prediction_files, read_pair
from samadapt.metrics import case_metrics
from samadapt.report import summarize

SPACING_XYZ = (0.8, 0.8, 3.0)
ANGLE = math.radians(20)  # rotated about z: an oblique direction
DIRECTION = (math.cos(ANGLE), -math.sin(ANGLE), 0.0, math.sin(ANGLE), math.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)
SHAPE = (10, 24, 20)  # z, y, x


def write(array, path, spacing=SPACING_XYZ, direction=DIRECTION):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin((10.0, -5.0, 2.0))
    sitk.WriteImage(image, str(path))
    return path


def blob(centre, radii, value=1):
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii)) <= 1
    return (inside * value).astype(np.int16)


def cases_on_disk(folder):
    """Three cases with classes 1 and 2: a good prediction, a miss of class 2 and a false positive on an empty
    class-2 reference; a manifest with a test split and a labels.json."""
    rng = np.random.default_rng(0)
    refs = {"sub-01": blob((5, 12, 10), (3, 7, 6)) + blob((5, 4, 4), (2, 2, 2), value=2),
            "sub-02": blob((4, 11, 9), (3, 6, 5)) + blob((6, 18, 14), (2, 3, 3), value=2),
            "sub-03": blob((5, 12, 11), (4, 8, 6))}
    preds = {"sub-01": np.roll(refs["sub-01"], 1, axis=2),
             "sub-02": np.roll(np.where(refs["sub-02"] == 2, 0, refs["sub-02"]), 1, axis=1).astype(np.int16),
             "sub-03": refs["sub-03"] + blob((2, 3, 3), (1, 1, 1), value=2)}
    rows = []
    (folder / "data").mkdir()
    for name, ref in refs.items():
        image = write((rng.random(SHAPE) * 100).astype(np.float32), folder / "data" / f"{name}.nii.gz")
        label = write(ref, folder / "data" / f"{name}_label.nii.gz")
        rows.append({"id": name, "image": str(image), "label": str(label), "modality": "MR", "split": "test"})
    rows.append({**rows[0], "id": "train-01", "split": "train"})  # not in split=test: needs no prediction
    manifest = folder / "data" / "cases.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / "data" / "labels.json").write_text(json.dumps({"labels": {"background": 0, "brain": 1, "lesion": 2}}),
                                                 encoding="utf-8")
    return manifest, refs, preds


def test_evaluate_predictions_folder_through_the_cli_equals_the_metrics(tmp_path):
    manifest, refs, preds = cases_on_disk(tmp_path)
    predictions = tmp_path / "nnunet_out"
    predictions.mkdir()
    for name, pred in preds.items():  # nnU-Net writes .nii.gz; any readable format works
        write(pred, predictions / f"{name}{'.nrrd' if name == 'sub-03' else '.nii.gz'}")
    (predictions / "plans.json").write_text("{}", encoding="utf-8")  # nnU-Net's extras are ignored
    out = tmp_path / "scored"
    run_cli("evaluate", f"predictions={predictions}", f"data={manifest}", "split=test", f"out={out}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    spacing_zyx = sitk.ReadImage(str(tmp_path / "data" / "sub-01_label.nii.gz")).GetSpacing()[::-1]  # float32 header
    expected = summarize([{"case_id": name, "reference_file": "", "prediction_file": "",
                           "metrics": case_metrics(preds[name], refs[name], spacing_zyx, [1, 2])} for name in refs])
    assert [case["case_id"] for case in summary["metric_per_case"]] == list(refs)
    for case, want in zip(summary["metric_per_case"], expected["metric_per_case"]):
        assert case["prediction_file"].startswith(str(predictions))
        for label in ("1", "2"):
            for name, value in want["metrics"][label].items():
                got = case["metrics"][label][name]
                assert (got is None and math.isnan(value)) or got == pytest.approx(value, abs=1e-9), (case, name)
    for label in ("1", "2"):
        for name in ("Dice", "HD95", "NSD_1mm", "n_miss", "n_false_positive", "n_both_empty"):
            assert summary["mean"][label][name] == pytest.approx(expected["mean"][label][name])
    assert (summary["mean"]["2"]["n_miss"], summary["mean"]["2"]["n_false_positive"]) == (1, 1)
    assert summary["label_names"] == {"0": "background", "1": "brain", "2": "lesion"}
    record = record_of(out)
    assert record["metrics"]["predictions_folder"] == str(predictions) and record["inputs"]["model"] is None
    assert record["inputs"]["predictions"]["sha256"] and not (out / "predictions").exists()
    assert (out / "per_case.csv").is_file() and any((out / "overlays").iterdir())

    # a prediction on another grid is a one-line error naming the file
    write(preds["sub-02"], predictions / "sub-02.nii.gz", spacing=(0.8, 0.8, 2.0))
    result = run_cli("evaluate", f"predictions={predictions}", f"data={manifest}", f"out={tmp_path / 'bad'}",
                     expect=None)
    assert_one_line_error(result, str(predictions / "sub-02.nii.gz"), "spacing", "sub-02_label.nii.gz")


def test_missing_doubled_and_off_grid_predictions_are_errors_naming_the_file(tmp_path):
    manifest, refs, preds = cases_on_disk(tmp_path)
    cases = [Case(name, tmp_path / "data" / f"{name}.nii.gz", tmp_path / "data" / f"{name}_label.nii.gz", "MR",
                  "test") for name in refs]
    folder = tmp_path / "preds"
    folder.mkdir()
    for name in ("sub-01", "sub-02"):
        write(preds[name], folder / f"{name}.nii.gz")
    with pytest.raises(UserError, match=r"sub-03\.nii\.gz: no prediction for case 'sub-03'"):
        prediction_files(folder, cases, manifest)
    write(preds["sub-03"], folder / "sub-03.nii.gz")
    write(preds["sub-03"], folder / "sub-03.mha")
    with pytest.raises(UserError, match=r"case 'sub-03' has 2 predictions \(sub-03.mha, sub-03.nii.gz\)"):
        prediction_files(folder, cases, manifest)
    (folder / "sub-03.mha").unlink()
    files = prediction_files(folder, cases, manifest)
    prediction, reference, spacing = read_pair(cases[0], files["sub-01"], 3)
    assert spacing == pytest.approx(SPACING_XYZ[::-1]) and np.array_equal(reference, refs["sub-01"])
    write(preds["sub-01"][:, :, :-1], folder / "sub-01.nii.gz")
    with pytest.raises(UserError, match=r"sub-01\.nii\.gz: prediction shape \(19, 24, 10\) \(x, y, z\) differs"):
        read_pair(cases[0], folder / "sub-01.nii.gz", 3)
    write(preds["sub-01"], folder / "sub-01.nii.gz", direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(UserError, match="prediction direction .* differs from its reference"):
        read_pair(cases[0], folder / "sub-01.nii.gz", 3)
    write(preds["sub-01"] * 2, folder / "sub-01.nii.gz")  # a class 4 where there are 3
    with pytest.raises(UserError, match="num_classes=3"):
        read_pair(cases[0], folder / "sub-01.nii.gz", 3)
    with pytest.raises(UserError, match="is not a folder"):
        prediction_files(tmp_path / "nowhere", cases, manifest)
