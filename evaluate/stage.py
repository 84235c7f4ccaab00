"""``samadapt evaluate``: predict every case of a split (or read its mask from ``predictions=``), score it, write
an nnU-Net-like report.

Writes ``out/predictions/<case>.<input format>`` (input geometry; not with ``predictions=``), ``out/summary.json``
(``metric_per_case``, ``mean`` per class, ``foreground_mean``, the scoring ``rules``), ``out/per_case.csv``,
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
from samadapt.errors import UserError
from samadapt.evaluate.config import EvaluateConfig
from samadapt.evaluate.folder import prediction_files, read_pair
from samadapt.io import cache_root, write_json
from samadapt.keys import preprocessing
from samadapt.metrics import case_metrics, image_diagonal_mm
from samadapt.models.pretrained import resolve_checkpoint
from samadapt.report import summarize, write_overlay_png, write_per_case_csv
from samadapt.stage_record import StageOutput, begin_stage, finish_stage
from samadapt.stages import STAGES

EVALUATE = STAGES["evaluate"]


def _foreground_dice(entry: dict) -> float:
    values = [m["Dice"] for m in entry["metrics"].values() if m["Dice"] is not None and not np.isnan(m["Dice"])]
    return float(np.mean(values)) if values else float("nan")


def run(config: EvaluateConfig) -> StageOutput:
    manifest = resolve_manifest(config.data)
    stage_run = begin_stage("evaluate", config, data=manifest, model=resolve_checkpoint(config.model),
                            predictions=config.predictions)
    state = PartialState()
    out = Path(config.out)
    cases = load_manifest(manifest, split=config.split, require_labels=True)
    label_names = load_label_names(manifest) or {}
    if config.predictions is not None:
        segment, num_classes, prep, facts = _folder_source(config, cases, manifest, label_names)
    else:
        segment, num_classes, prep, facts = _model_source(config, cases, manifest, label_names, state, out)
    labels = range(1, num_classes)
    entries, metric_seconds = [], 0.0
    with state.split_between_processes(cases) as mine:
        for case in mine:
            prediction, reference, spacing, prediction_file = segment(case)
            tick = time.perf_counter()
            scores = case_metrics(prediction, reference, spacing, labels, config.nsd_tolerances,
                                  empty_penalty=config.empty_penalty)
            metric_seconds += time.perf_counter() - tick
            entries.append({"case_id": case.id, "reference_file": str(Path(case.label).absolute()),
                            "prediction_file": str(prediction_file.absolute()),
                            "image_diagonal_mm": image_diagonal_mm(prediction.shape, spacing),
                            "metrics": {str(k): v for k, v in scores.items()}})
    entries = gather_object(entries)
    metric_seconds = sum(gather_object([metric_seconds]))
    record = None
    if state.is_main_process:
        entries.sort(key=lambda e: e["case_id"])
        summary = summarize(entries, config.nsd_tolerances, empty_penalty=config.empty_penalty)
        summary["label_names"] = label_names
        write_json(EVALUATE.path(out, "summary"), summary)
        write_per_case_csv(summary, EVALUATE.path(out, "per_case"), summary["label_names"] or None)
        if config.overlays:
            _write_overlays(entries, cases, prep, num_classes, out)
        wall = time.time() - stage_run.started
        metrics = {
            "cases": len(entries),
            "foreground_mean": summary["foreground_mean"],
            "metric_seconds": round(metric_seconds, 3),
            "metric_share": round(metric_seconds / max(wall, 1e-9), 4),
            **facts,
        }
        artifacts = {name: EVALUATE.path(out, name) for name in EVALUATE.artifacts if EVALUATE.path(out, name).exists()}
        record = finish_stage("evaluate", config, stage_run, artifacts, metrics)
        dice = summary["foreground_mean"].get("Dice")
        print(f"evaluate: {len(entries)} cases, foreground mean Dice {dice:.4f} → {EVALUATE.path(out, 'summary')}")
    state.wait_for_everyone()
    return record


def _model_source(config: EvaluateConfig, cases: list, manifest: Path, label_names: dict, state, out: Path):
    """Segment each case with ``config.model`` and write ``out/predictions/<case>``: ``(segment(case) ->
    (prediction, reference, spacing (z, y, x) mm, prediction file), num_classes, preprocessing, record facts)``."""
    from samadapt.inference import PromptSettings, load_model, predict_case  # peft, SAM: not to score a folder

    # zero-shot without num_classes=: the classes named beside the manifest
    loaded = load_model(config, config.prompt, default_num_classes=max(label_names) + 1 if label_names else None)
    model = loaded.model.to(state.device)
    unknown = sorted({c.modality for c in cases} - set(loaded.train_modalities)) if loaded.train_modalities else []
    if unknown and state.is_main_process:
        print(f"warning: {manifest}: modality {', '.join(unknown)} differs from the training data's "
              f"({', '.join(loaded.train_modalities)}) — expect a domain gap", file=sys.stderr)
    if config.box_protocol == "volume" and loaded.prompt != "box":
        raise UserError(f"box_protocol=volume propagates box prompts, but {config.model} segments with "
                        f"prompt={loaded.prompt} — set prompt=box (a box-prompted model or a SAM checkpoint)")
    # the config carries the prompt keys
    settings = PromptSettings(loaded.prompt, config, config.seed, volume_box=config.box_protocol == "volume")
    store = None
    if config.embedding_cache and hasattr(model, "sam"):  # a SAM (the U-Net baseline has no encoder to keep)
        from samadapt.embedding_store import EmbeddingStore

        store = EmbeddingStore(config.cache_dir or cache_root(), model)

    def segment(case):
        prediction, slices = predict_case(model, case, loaded.prep, config.batch_size, settings, state.device,
                                          loaded.num_classes, store=store)
        prediction_file = EVALUATE.path(out, "predictions") / output_name(case.image, case.id)
        slices.write(prediction, prediction_file)
        return prediction, slices.reference, slices.geometry["spacing"][::-1], prediction_file  # (z, y, x)

    facts = {"prompt": loaded.prompt,
             "prompt_protocol": settings.protocol, "input_norm": getattr(model, "input_norm", None)}
    return segment, loaded.num_classes, loaded.prep, facts


def _folder_source(config: EvaluateConfig, cases: list, manifest: Path, label_names: dict):
    """Read each case's mask from ``config.predictions`` (no model): the same tuple as :func:`_model_source`.
    The classes: ``num_classes=``, else the manifest's labels.json."""
    num_classes = config.num_classes or (max(label_names) + 1 if label_names else None)
    if num_classes is None:
        raise UserError(f"{manifest}: predictions= needs the classes — set num_classes= (incl. background) or put "
                        "a labels.json beside the manifest")
    files = prediction_files(config.predictions, cases, manifest)

    def segment(case):
        prediction, reference, spacing = read_pair(case, files[case.id], num_classes)
        return prediction, reference, spacing, files[case.id]

    return segment, num_classes, preprocessing(config), {"predictions_folder": str(Path(config.predictions).absolute())}


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
