"""``samadapt baseline`` (MONAI 2D U-Net) through the real CLI on real MRI: it trains on the finetune stage's slices
and split, resumes a killed run exactly, and ``samadapt evaluate`` scores its folder like a SAM run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_when, losses, record_of, run_cli
from samadapt.errors import UserError
from samadapt.inference import load_model


def baseline_args(data: Path, out: Path) -> list[str]:
    keys = {"data": data, "out": out, "num_classes": 2, "image_size": 64, "steps": 3, "save_every": 2,
            "val_every": 3, "log_every": 1, "batch_size": 4, "lr": 3e-3, "tensorboard": "false"}
    return ["baseline", *(f"{k}={v}" for k, v in keys.items())]


@pytest.fixture(scope="module")
def baseline(small_manifests, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "run"
    run_cli(*baseline_args(small_manifests["brain"], out))
    return out


def test_baseline_trains_a_small_monai_unet_on_the_split_and_records_it(baseline):
    record = record_of(baseline)
    metrics = record["metrics"]
    assert record["stage"] == "baseline" and metrics["steps"] == 3
    assert metrics["train_cases"] == ["mni2mm"] and metrics["val_cases"] == ["colin27"]  # the test row never
    assert 0.1e6 < metrics["params"] < 0.5e6  # the default channels: a small U-Net
    assert sorted(record["artifacts"]) == ["metrics", "splits", "unet", "validation"]
    splits = json.loads((baseline / "splits.json").read_text(encoding="utf-8"))
    assert (splits["train"], splits["val"], splits["test"]) == (["mni2mm"], ["colin27"], ["colin27_test"])
    validation = json.loads((baseline / "validation.json").read_text(encoding="utf-8"))
    assert validation["best_step"] == 3 and 0.0 < validation["best_dice"] <= 1.0
    with open(baseline / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(0.0 <= float(r["train_dice"]) <= 1.0 for r in rows)
    weights = load_file(str(baseline / "unet.safetensors"))
    assert sum(t.numel() for t in weights.values()) == metrics["params"]


def test_killed_baseline_resumes_and_matches_an_uninterrupted_run(baseline, small_manifests, tmp_path):
    out = tmp_path / "killed"
    args = baseline_args(small_manifests["brain"], out)
    kill_when(args, out / "state" / "step_2" / "progress.json")
    assert not (out / "stage_output.json").exists()
    run_cli(*args)
    record = record_of(out)
    assert record["metrics"]["resumed_from_step"] == 2
    assert losses(out)[3] == pytest.approx(losses(baseline)[3], rel=1e-5)
    resumed, straight = load_file(str(out / "unet.safetensors")), load_file(str(baseline / "unet.safetensors"))
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_evaluate_scores_the_baseline_folder_like_a_sam_run(baseline, small_manifests, tmp_path):
    out = tmp_path / "evaluate"
    run_cli("evaluate", f"model={baseline}", f"data={small_manifests['brain']}", "split=test", f"out={out}",
            "overlays=false")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [c["case_id"] for c in summary["metric_per_case"]] == ["colin27_test"]
    # colin27_test is the validation volume again: evaluate and the training's validator saw the same prediction
    best = json.loads((baseline / "validation.json").read_text(encoding="utf-8"))["best_dice"]
    assert summary["foreground_mean"]["Dice"] == pytest.approx(best, abs=1e-6)
    assert record_of(out)["metrics"]["prompt"] == "none"
    with pytest.raises(UserError, match="segments without prompts"):
        load_model(SimpleNamespace(model=str(baseline)), prompt="box")
