"""Evaluation reports: nnU-Net-like ``summary.json`` content, per-case CSV, overlay PNGs, run comparison.

Everything here works on metric dicts from ``samadapt.metrics.case_metrics`` and on arrays;
no model code. Label keys are strings (``"1"``), as in nnU-Net's ``summary.json``. NaN marks an
undefined score (both masks empty, or HD95 with one mask empty): it is left out of means and counted in
``n_nan``; ``samadapt.io.write_json`` writes it as ``null`` and the CSVs leave the cell empty.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from samadapt.data.formats import volume_stem
from samadapt.errors import UserError
from samadapt.io import atomic_path, write_text
from samadapt.metrics import COUNTS, SCORES
from samadapt.stages import STAGES

SUMMARY = STAGES["evaluate"].artifacts["summary"]
FOREGROUND = "foreground"
OVERLAY_DPI = 100
OVERLAY_PANEL_INCHES = 3.0  # each slice panel is 300 x 330 px (the extra 10% holds title and legend)
REF_COLOUR, PRED_COLOUR = "lime", "red"


def summarize(cases: Sequence[Mapping[str, Any]], nsd_tolerance_mm: float = 2.0) -> dict:
    """nnU-Net-like summary of per-case metrics.

    cases: ``[{"reference_file", "prediction_file", "metrics": {label: {"Dice", "IoU", "NSD", "HD95",
    "n_ref", "n_pred"}}}]`` (label keys int or str; None is read as NaN, so a re-read summary works).
    nsd_tolerance_mm: the tolerance the NSD values were computed with; recorded so that reports can
    name it (``nsd_2mm``).

    Returns ``{"metric_per_case": cases (label keys as str), "mean": {label: {metric: NaN-ignoring mean
    over cases, "n_nan": {score: count}}}, "foreground_mean": {score: mean of the non-zero labels' means},
    "nsd_tolerance_mm": float}``.
    """
    per_case = [{**case, "metrics": {str(label): {name: _as_float(value) if name in SCORES else value
                                                  for name, value in scores.items()}
                                     for label, scores in case["metrics"].items()}}
                for case in cases]
    labels = sorted({label for case in per_case for label in case["metrics"]}, key=int)
    mean = {}
    for label in labels:
        rows = [case["metrics"][label] for case in per_case if label in case["metrics"]]
        values = {name: np.array([_as_float(row.get(name)) for row in rows]) for name in SCORES + COUNTS}
        mean[label] = {name: _nanmean(column) for name, column in values.items()}
        mean[label]["n_nan"] = {name: int(np.isnan(values[name]).sum()) for name in SCORES}
    foreground = [label for label in labels if label != "0"]
    foreground_mean = {name: _nanmean(np.array([mean[label][name] for label in foreground])) for name in SCORES}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground_mean,
            "nsd_tolerance_mm": float(nsd_tolerance_mm)}


def score_columns(nsd_tolerance_mm: float) -> dict[str, str]:
    """CSV column per score, with units and the NSD tolerance in the name."""
    return {"Dice": "dice", "IoU": "iou", "NSD": f"nsd_{nsd_tolerance_mm:g}mm", "HD95": "hd95_mm"}


def case_id(case: Mapping[str, Any]) -> str:
    """A case's name: its manifest id, else its reference file name without image extensions
    (``sub-01.nii.gz`` → ``sub-01``)."""
    if case.get("case_id"):
        return str(case["case_id"])
    name = volume_stem(str(case["reference_file"]))
    return name[: -len(".npy")] if name.endswith(".npy") else name


def write_per_case_csv(summary: Mapping[str, Any], path: str | Path,
                       label_names: Mapping[int | str, str] | None = None) -> Path:
    """Write one row per case and label: case, files, label, label_name, dice, iou, nsd_<tol>mm, hd95_mm,
    n_ref_voxels, n_pred_voxels. NaN (undefined) scores are empty cells. Atomic."""
    names = {str(label): name for label, name in (label_names or {}).items()}
    columns = score_columns(summary.get("nsd_tolerance_mm", 2.0))
    header = ["case", "reference_file", "prediction_file", "label", "label_name", *columns.values(),
              "n_ref_voxels", "n_pred_voxels"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for case in summary["metric_per_case"]:
        for label, scores in sorted(case["metrics"].items(), key=lambda item: int(item[0])):
            writer.writerow([case_id(case), case["reference_file"], case["prediction_file"], label,
                             names.get(str(label), ""), *(_cell(scores.get(name)) for name in columns),
                             scores["n_ref"], scores["n_pred"]])
    return write_text(path, buffer.getvalue())


def write_overlay_png(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, path: str | Path, title: str,
                      spacing: Sequence[float] | None = None, n_slices: int = 3) -> Path:
    """Save ``n_slices`` slices along the first axis (z) with reference and prediction contours.

    image: float Z x Y x X; ref, pred: integer label maps Z x Y x X (one contour per label value).
    Slices are spread evenly through the reference's z-extent (the prediction's if the reference is
    empty, else the whole volume). spacing: (z, y, x) in mm, only used to draw pixels with the right
    aspect ratio. The PNG is ``300 * n_slices`` x 330 px (Agg, written atomically).
    """
    image, ref, pred = np.asarray(image, dtype=np.float32), np.asarray(ref), np.asarray(pred)
    if not image.shape == ref.shape == pred.shape:
        raise ValueError(f"image {image.shape}, reference {ref.shape} and prediction {pred.shape} differ in shape")
    slices = overlay_slices(ref, pred, n_slices)
    low, high = np.percentile(image[slices], [0.5, 99.5])  # shown slices only: a full 256^3 sort is slow
    aspect = spacing[1] / spacing[2] if spacing is not None else 1.0  # pixel height / width
    fig = Figure(figsize=(OVERLAY_PANEL_INCHES * n_slices, OVERLAY_PANEL_INCHES * 1.1), dpi=OVERLAY_DPI)
    for ax, z in zip(fig.subplots(1, n_slices, squeeze=False)[0], slices):
        ax.imshow(image[z], cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        _draw_contours(ax, ref[z], REF_COLOUR)
        _draw_contours(ax, pred[z], PRED_COLOUR)
        ax.set_title(f"z = {z}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.legend(handles=[Line2D([], [], color=REF_COLOUR, label="reference"),
                        Line2D([], [], color=PRED_COLOUR, label="prediction")],
               loc="lower center", ncol=2, fontsize=7, frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=OVERLAY_DPI)
    return Path(path)


def overlay_slices(ref: np.ndarray, pred: np.ndarray, n_slices: int) -> list[int]:
    """Indices along axis 0 spread evenly (excluding the ends) through the reference's extent."""
    for mask in (ref, pred):
        hits = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if hits.size:
            first, last = int(hits[0]), int(hits[-1])
            break
    else:
        first, last = 0, ref.shape[0] - 1
    return [int(round(z)) for z in np.linspace(first, last, n_slices + 2)[1:-1]]


def _draw_contours(ax, labels_2d: np.ndarray, colour: str) -> None:
    for value in np.unique(labels_2d):
        if value != 0:
            ax.contour(labels_2d == value, levels=[0.5], colors=colour, linewidths=0.8)


def compare_runs(eval_dirs: Sequence[str | Path], out_prefix: str | Path, names: Sequence[str] | None = None,
                 label_names: Mapping[int | str, str] | None = None) -> str:
    """Compare evaluation runs by their ``summary.json``: writes ``<prefix>.md`` (table run x class x mean
    Dice/IoU/NSD/HD95 plus the foreground mean), ``<prefix>.csv`` and ``<prefix>.png`` (grouped bars
    of mean Dice per class and run). Returns the Markdown. Runs are named by ``names`` or their folders.
    """
    eval_dirs = [Path(d) for d in eval_dirs]
    names = list(names) if names is not None else _default_names(eval_dirs)
    if len(names) != len(eval_dirs):
        raise UserError(f"compare: {len(names)} names for {len(eval_dirs)} evaluation folders — "
                        "give one name per folder")
    summaries = [read_summary(d) for d in eval_dirs]
    tolerance = _common_tolerance(eval_dirs, summaries)
    if label_names is None:  # the names the evaluations recorded from their manifests' labels.json
        label_names = {k: v for s in summaries for k, v in (s.get("label_names") or {}).items()}
    label_names = {str(label): name for label, name in label_names.items()}
    # Classes by number; nnU-Net region keys such as "(1, 2)" (several labels scored as one) after them.
    labels = sorted(
        {label for s in summaries for label in s["mean"]},
        key=lambda label: (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label),
    )

    columns = score_columns(tolerance)
    # (run, eval_dir, label or "foreground", class shown to people, {score: mean}, cases, cases without HD95)
    rows = []
    for name, eval_dir, summary in zip(names, eval_dirs, summaries):
        cases = len(summary.get("metric_per_case", []))
        no_hd95 = {label: means.get("n_nan", {}).get("HD95", 0) for label, means in summary["mean"].items()}
        for label in labels:
            if label in summary["mean"]:
                shown = f"{label} ({label_names[label]})" if label in label_names else label
                rows.append((name, eval_dir, label, shown, summary["mean"][label], cases, no_hd95[label]))
        rows.append(
            (
                name,
                eval_dir,
                FOREGROUND,
                "foreground mean",
                summary["foreground_mean"],
                cases,
                sum(no_hd95[label] for label in no_hd95 if label != "0"),
            )
        )

    # The HD95 mean skips cases without a value (empty prediction or both empty): show how many it skipped.
    markdown = [
        f"| run | class | cases | Dice | IoU | NSD ({tolerance:g} mm) | HD95 (mm) | HD95 n/a |",
        "|---|---|---|---|---|---|---|---|",
    ]
    markdown += [
        f"| {run} | {shown} | {cases} | " + " | ".join(_shown(means.get(s), s) for s in SCORES) + f" | {missing} |"
        for run, _, _, shown, means, cases, missing in rows
    ]
    text = "\n".join(markdown) + "\n"
    write_text(Path(f"{out_prefix}.md"), text)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "eval_dir", "label", "label_name", "cases", *columns.values(), "hd95_missing"])
    for run, eval_dir, label, _, means, cases, missing in rows:
        writer.writerow(
            [run, eval_dir, label, label_names.get(label, ""), cases, *(_cell(means.get(s)) for s in SCORES), missing]
        )
    write_text(Path(f"{out_prefix}.csv"), buffer.getvalue())

    _write_dice_bars(Path(f"{out_prefix}.png"), names, summaries, labels, label_names)
    return text


def read_summary(eval_dir: Path) -> dict:
    """``eval_dir/summary.json`` checked for the keys a comparison needs, or a UserError naming the folder."""
    path = Path(eval_dir) / SUMMARY
    if not path.is_file():
        raise UserError(f"{eval_dir}: no {SUMMARY} — run `samadapt evaluate ... out={eval_dir}` first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}) — rerun the evaluation") from None
    if (
        not isinstance(summary, dict)
        or not isinstance(summary.get("mean"), dict)
        or not isinstance(summary.get("foreground_mean"), dict)
    ):
        raise UserError(f"{path}: no 'mean'/'foreground_mean' — not a samadapt evaluate summary")
    return summary


def _common_tolerance(eval_dirs: Sequence[Path], summaries: Sequence[dict]) -> float:
    tolerances = {float(s.get("nsd_tolerance_mm", 2.0)) for s in summaries}
    if len(tolerances) > 1:
        listed = ", ".join(f"{d}: {s.get('nsd_tolerance_mm', 2.0)} mm" for d, s in zip(eval_dirs, summaries))
        raise UserError(f"compare: NSD tolerances differ ({listed}) — re-evaluate with one nsd_tolerance_mm")
    return tolerances.pop()


def _write_dice_bars(
    path: Path, names: Sequence[str], summaries: Sequence[dict], labels: Sequence[str], label_names: Mapping[str, str]
) -> None:
    fig = Figure(figsize=(max(6.0, 1.5 + 0.35 * len(labels) * len(names)), 4.0), dpi=OVERLAY_DPI)
    ax = fig.subplots()
    width = 0.8 / len(names)
    positions = np.arange(len(labels))
    for index, (name, summary) in enumerate(zip(names, summaries)):
        dice = [_as_float(summary["mean"].get(label, {}).get("Dice")) for label in labels]
        ax.bar(positions - 0.4 + width * (index + 0.5), dice, width, label=name)
    ax.set_xticks(positions, [label_names.get(label, label) for label in labels])
    ax.set_xlabel("class")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _default_names(eval_dirs: Sequence[Path]) -> list[str]:
    """Folder names, with more parent folders while they do not tell runs apart (runs/a/evaluate)."""
    for depth in range(1, max(len(d.resolve().parts) for d in eval_dirs) + 1):
        names = ["/".join(d.resolve().parts[-depth:]) for d in eval_dirs]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in eval_dirs]


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _nanmean(values: np.ndarray) -> float:
    """Mean ignoring NaN; NaN (without numpy's warning) when nothing is left."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _cell(value: Any) -> str:
    value = _as_float(value)
    return "" if math.isnan(value) else f"{value:.6g}"


def _shown(value: Any, score: str) -> str:
    value = _as_float(value)
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if score == "HD95" else f"{value:.4f}"
