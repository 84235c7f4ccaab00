"""``samadapt evaluate``: predict every case of a split, score it, write an nnU-Net-like report.

Writes ``out/predictions/<case>.<input format>`` (input geometry), ``out/summary.json``
(``metric_per_case``, ``mean`` per class, ``foreground_mean``), ``out/per_case.csv``,
``out/overlays/<case>.png`` for the worst, median and best case, and ``out/stage_output.json`` last.
Under ``accelerate launch`` the cases are split across processes and the per-case results gathered once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from accelerate import PartialState
from accelerate.utils import gather_object

from samadapt.data import readers
from samadapt.data.formats import output_name
from samadapt.data.manifest import load_label_names, load_manifest, resolve_manifest
from samadapt.evaluate.config import EvaluateConfig
from samadapt.inference import PromptSettings, load_model, predict_case
from samadapt.io import write_json
from samadapt.metrics import case_metrics
from samadapt.report import summarize, write_overlay_png, write_per_case_csv
from samadapt.stage_record import StageOutput, begin_stage, finish_stage
from samadapt.stages import STAGES

EVALUATE = STAGES["evaluate"]


def _foreground_dice(entry: dict) -> float:
    values = [m["Dice"] for m in entry["metrics"].values() if m["Dice"] is not None and not np.isnan(m["Dice"])]
    return float(np.mean(values)) if values else float("nan")


def run(config: EvaluateConfig) -> StageOutput:
    manifest = resolve_manifest(config.data)
    stage_run = begin_stage("evaluate", config, data=manifest, model=config.model)
    state = PartialState()
    out = Path(config.out)
    cases = load_manifest(manifest, split=config.split, require_labels=True)
    label_names = load_label_names(manifest) or {}
    # zero-shot without num_classes=: the classes named beside the manifest
    loaded = load_model(config, config.prompt, default_num_classes=max(label_names) + 1 if label_names else None)
    model = loaded.model.to(state.device)
    unknown = sorted({c.modality for c in cases} - set(loaded.train_modalities)) if loaded.train_modalities else []
    if unknown and state.is_main_process:
        print(f"warning: {manifest}: modality {', '.join(unknown)} differs from the training data's "
              f"({', '.join(loaded.train_modalities)}) — expect a domain gap", file=sys.stderr)
    settings = PromptSettings(loaded.prompt, config, config.seed)  # the config carries the prompt keys
    labels = range(1, loaded.num_classes)
    entries, metric_seconds = [], 0.0
    with state.split_between_processes(cases) as mine:
        for case in mine:
            prediction, slices = predict_case(model, case, loaded.prep, config.batch_size, settings, state.device,
                                              loaded.num_classes)
            prediction_file = EVALUATE.path(out, "predictions") / output_name(case.image, case.id)
            slices.write(prediction, prediction_file)
            tick = time.perf_counter()
            scores = case_metrics(prediction, slices.reference, slices.geometry["spacing"][::-1], labels,
                                  config.nsd_tolerance_mm)
            metric_seconds += time.perf_counter() - tick
            entries.append({"case_id": case.id, "reference_file": str(case.label),
                            "prediction_file": str(prediction_file),
                            "metrics": {str(k): v for k, v in scores.items()}})
    entries = gather_object(entries)
    metric_seconds = sum(gather_object([metric_seconds]))
    record = None
    if state.is_main_process:
        entries.sort(key=lambda e: e["case_id"])
        summary = summarize(entries, config.nsd_tolerance_mm)
        summary["label_names"] = label_names
        write_json(EVALUATE.path(out, "summary"), summary)
        write_per_case_csv(summary, EVALUATE.path(out, "per_case"), summary["label_names"] or None)
        if config.overlays:
            _write_overlays(entries, cases, loaded.prep, loaded.num_classes, out)
        wall = time.time() - stage_run.started
        metrics = {
            "cases": len(entries),
            "foreground_mean": summary["foreground_mean"],
            "metric_seconds": round(metric_seconds, 3),
            "metric_share": round(metric_seconds / max(wall, 1e-9), 4),
            "prompt": loaded.prompt,
        }
        artifacts = {name: EVALUATE.path(out, name) for name in EVALUATE.artifacts if EVALUATE.path(out, name).exists()}
        record = finish_stage("evaluate", config, stage_run, artifacts, metrics)
        dice = summary["foreground_mean"].get("Dice")
        print(f"evaluate: {len(entries)} cases, foreground mean Dice {dice:.4f} → {EVALUATE.path(out, 'summary')}")
    state.wait_for_everyone()
    return record


def _write_overlays(entries: list[dict], cases: list, prep, num_classes: int, out: Path) -> None:
    """Overlays of the worst, median and best case by foreground Dice."""
    ranked = sorted((e for e in entries if not np.isnan(_foreground_dice(e))), key=_foreground_dice)
    if not ranked:
        return
    picks = {"worst": ranked[0], "median": ranked[len(ranked) // 2], "best": ranked[-1]}
    by_id = {c.id: c for c in cases}
    for tag, entry in picks.items():
        case = by_id[entry["case_id"]]
        volume = readers.read_volume(case.image, channel=prep.channel, series_uid=case.series_uid)
        image = readers.to_array(volume, case.image)
        reference = readers.read_label(case.label, volume, case.image, prep.resample_labels, num_classes)
        prediction = readers.to_array(readers.read_volume(entry["prediction_file"]), entry["prediction_file"])
        write_overlay_png(
            image,
            reference,
            prediction,
            EVALUATE.path(out, "overlays") / f"{case.id}.png",
            f"{case.id} ({tag}, Dice {_foreground_dice(entry):.3f})",
            spacing=volume.GetSpacing()[::-1],
        )
