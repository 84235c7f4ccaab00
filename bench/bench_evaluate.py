"""Evaluation: share of wall time spent in metrics, and predict slices/s (JSON on stdout).

    python bench/bench_evaluate.py [--quick]

``metrics_share``: a short ``samadapt finetune`` run (2 steps, random base, no validation) then
``samadapt.evaluate.stage.run`` on a ``demo:brain`` split (test: Colin27 at 1 mm; val: MNI152 at 2 mm in
--quick), the whole volume predicted and scored (Dice, IoU, NSD, HD95); the stage itself records ``metric_seconds`` and
``metric_share`` = metric time ÷ its wall time. vit_tiny in --quick, vit_b 256 in the full run (a real
model's inference time; vit_tiny's is far below any real model's, see ``detail``).

``predict_slices_per_s``: ``predict_slices`` (the inference loop of predict/evaluate, batch 8) on the
first slices of the same volume, vit_tiny and vit_b at 256 px, one warm-up batch excluded. value = vit_b
(null in --quick, where only vit_tiny runs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import entry, print_json, quiet_stdout, set_threads

EVAL_BATCH = 8


class FirstSlices:
    """The first ``count`` slices of a ``VolumeSlices`` (what ``predict_slices`` reads: chunks, image_path)."""

    def __init__(self, slices, count: int):
        self.slices, self.count, self.image_path = slices, count, slices.image_path

    def chunks(self, size: int):
        for start, images, labels in self.slices.chunks(size):
            if start >= self.count:
                return
            yield start, images, labels


def finetune_then_evaluate(arch: str, tmp: Path, split: str) -> dict:
    from samadapt.evaluate import stage as evaluate_stage
    from samadapt.evaluate.config import EvaluateConfig
    from samadapt.finetune import stage as finetune_stage
    from samadapt.finetune.config import FinetuneConfig

    trained = tmp / f"finetune_{arch}"
    finetune_stage.run(FinetuneConfig(data="demo:brain", out=trained, num_classes=2, arch=arch, image_size=256,
                                      encoder="lora", decoder="full", prompt="none", batch_size=2, steps=2,
                                      val_split=None, save_every=10**9, log_every=1))
    out = tmp / f"evaluate_{arch}"
    start = time.perf_counter()
    evaluate_stage.run(EvaluateConfig(model=str(trained), data="demo:brain", split=split, out=out))
    wall = time.perf_counter() - start
    metrics = json.loads((out / "stage_output.json").read_text(encoding="utf-8"))["metrics"]
    return {"metric_share": metrics["metric_share"], "metric_seconds": metrics["metric_seconds"],
            "evaluate_wall_s": round(wall, 2), "cases": metrics["cases"], "split": split}


def realistic_metric_seconds(split: str) -> float:
    """Seconds of ``case_metrics`` on the split's reference with a near-miss prediction (the reference shifted
    by 2 voxels along every axis): full surfaces to compare, as a trained model gives. A barely trained
    model predicts empty or fragmented masks, whose metric time says little."""
    import numpy as np

    from samadapt.data import readers
    from samadapt.data.manifest import load_manifest, resolve_manifest
    from samadapt.metrics import case_metrics

    case = load_manifest(resolve_manifest("demo:brain"), split=split)[0]
    volume = readers.read_volume(case.label)
    reference = readers.to_array(volume, case.label)
    prediction = np.roll(reference, (2, 2, 2), axis=(0, 1, 2))
    start = time.perf_counter()
    case_metrics(prediction, reference, volume.GetSpacing()[::-1], [1])
    return time.perf_counter() - start


def predict_rate(arch: str, count: int) -> float:
    """Slices/s of ``predict_slices`` over ``count`` slices of the demo test volume."""
    from samadapt.data.manifest import load_manifest, resolve_manifest
    from samadapt.data.slices import VolumeSlices
    from samadapt.finetune.config import FinetuneConfig
    from samadapt.finetune.stage import build_model
    from samadapt.inference import AUTOMATIC, predict_slices
    from samadapt.keys import preprocessing

    with tempfile.TemporaryDirectory() as tmp:
        config = FinetuneConfig(data="demo:brain", out=Path(tmp), num_classes=2, arch=arch, image_size=256,
                                encoder="lora", decoder="full", prompt="none")
        model = build_model(config)
    case = load_manifest(resolve_manifest(config.data), split="test")[0]
    slices = VolumeSlices(case.image, preprocessing(config), case.modality)
    predict_slices(model, FirstSlices(slices, EVAL_BATCH), EVAL_BATCH, AUTOMATIC)  # warm-up
    start = time.perf_counter()
    predict_slices(model, FirstSlices(slices, count), EVAL_BATCH, AUTOMATIC)
    return min(count, len(slices)) / (time.perf_counter() - start)


def measure(quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        split = "val" if quick else "test"  # val: MNI152 at 2 mm (small); test: Colin27 at 1 mm
        archs = ("vit_tiny",) if quick else ("vit_tiny", "vit_b")
        runs = {arch: finetune_then_evaluate(arch, Path(tmp), split) for arch in archs}
    share_from = "vit_tiny" if quick else "vit_b"
    run = runs[share_from]
    realistic = realistic_metric_seconds(split)
    # The same evaluation with a trained model's metric time in place of the measured one.
    estimate = realistic / (run["evaluate_wall_s"] - run["metric_seconds"] + realistic)
    share = entry(max(run["metric_share"], estimate), "<= 0.1",
                  {"value_from": f"{share_from} 256: max(stage metric_share, share with a near-miss mask)",
                   "near_miss_metric_seconds": round(realistic, 3), "near_miss_share": round(estimate, 4),
                   **{f"{a}_256": r for a, r in runs.items()}})
    rates = {"vit_tiny_256": round(predict_rate("vit_tiny", 32 if quick else 64), 2)}
    if not quick:
        rates["vit_b_256"] = round(predict_rate("vit_b", 48), 2)
    predict = entry(rates.get("vit_b_256"), "report", {"batch": EVAL_BATCH, **rates})
    return {"metrics_share": share, "predict_slices_per_s": predict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    with quiet_stdout():
        result = measure(args.quick)
    print_json(result)


if __name__ == "__main__":
    main()
