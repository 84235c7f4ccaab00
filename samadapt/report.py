"""Evaluation reports: nnU-Net-like ``summary.json`` content (and reading one back, nnU-Net's own too), per-case
CSV, overlay PNGs (comparisons of runs: ``samadapt.compare``).

Everything here works on metric dicts from ``samadapt.metrics.case_metrics`` and on arrays;
no model code. Label keys are strings (``"1"``), as in nnU-Net's ``summary.json``. NaN marks an
undefined score (both masks empty; HD95/NSD of a miss or a false positive with ``empty_penalty=false``): it is
left out of means and counted in ``n_nan``; ``samadapt.io.write_json`` writes it as ``null`` and the CSVs leave
the cell empty. The scoring rules are ``samadapt.metrics``'s and are written into ``summary.json`` ("rules").
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
from samadapt.metrics import (
    COUNTS,
    DEFAULT_NSD_TOLERANCES_MM,
    EMPTY_CASES,
    SIZE_STRATA,
    empty_case,
    nsd_name,
    parse_tolerances,
    rules,
    score_names,
    size_stratum,
)
from samadapt.stages import STAGES

SUMMARY = STAGES["evaluate"].artifacts["summary"]
NNUNET = "nnU-Net"  # the "source" of an imported nnU-Net summary.json
OVERLAY_DPI = 100
OVERLAY_PANEL_INCHES = 3.0  # each slice panel is 300 x 330 px (the extra 10% holds title and legend)
REF_COLOUR, PRED_COLOUR = "lime", "red"


def summarize(cases: Sequence[Mapping[str, Any]],
              nsd_tolerances_mm: float | Sequence[float] | str = DEFAULT_NSD_TOLERANCES_MM,
              empty_penalty: bool = True) -> dict:
    """nnU-Net-like summary of per-case metrics.

    cases: ``[{"reference_file", "prediction_file", "metrics": {label: {"Dice", "IoU", "NSD_<t>mm"..., "HD95",
    "TP", "FP", "FN", "TN", "n_pred", "n_ref"}}}]`` (label keys int or str; None is read as NaN, so a re-read
    summary works). nsd_tolerances_mm, empty_penalty: the settings the metrics were computed with
    (``case_metrics``); recorded so that reports can name them.

    Returns ``{"metric_per_case": cases (label keys as str), "mean": {label: {score or count: NaN-ignoring mean
    over cases, "n_cases", "n_miss", "n_false_positive", "n_both_empty": case counts, "n_nan": {score: count},
    "strata": {stratum with cases: {"n_cases", score: mean}} (object size, ``samadapt.metrics.size_stratum``)}},
    "foreground_mean": {score or count: mean of the non-zero labels' means (NaN if one is NaN, as nnU-Net)},
    "nsd_tolerances_mm": [t...], "empty_penalty": bool, "rules": {rule: one line}}``.
    """
    tolerances = parse_tolerances(nsd_tolerances_mm)
    scores = score_names(tolerances)
    per_case = [{**case, "metrics": {str(label): {name: as_float(value) if name in scores else value
                                                  for name, value in values.items()}
                                     for label, values in case["metrics"].items()}}
                for case in cases]
    labels = sorted({label for case in per_case for label in case["metrics"]}, key=label_order)
    mean = {}
    for label in labels:
        rows = [case["metrics"][label] for case in per_case if label in case["metrics"]]
        values = {name: np.array([as_float(row.get(name)) for row in rows]) for name in scores + COUNTS}
        mean[label] = {name: nanmean(column) for name, column in values.items()}
        kinds = [empty_case(row.get("n_pred"), row.get("n_ref")) for row in rows if _has_counts(row)]
        mean[label]["n_cases"] = len(rows)
        mean[label] |= {f"n_{kind}": kinds.count(kind) for kind in EMPTY_CASES}
        mean[label]["n_nan"] = {name: int(np.isnan(values[name]).sum()) for name in scores}
        strata = [stratum(row) for row in rows]
        mean[label]["strata"] = {
            name: {"n_cases": strata.count(name)} | {
                score: nanmean(values[score][[s == name for s in strata]]) for score in scores}
            for name, _ in SIZE_STRATA if name in strata}
    foreground = [label for label in labels if label != "0"]
    # nnU-Net: np.mean over the classes' means, so a class without any defined value makes it NaN.
    foreground_mean = {name: float(np.mean([mean[label][name] for label in foreground])) if foreground else math.nan
                       for name in scores + COUNTS}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground_mean,
            "nsd_tolerances_mm": list(tolerances), "empty_penalty": bool(empty_penalty),
            "rules": rules(tolerances, empty_penalty)}


def label_order(label: str) -> tuple:
    """Sort key of summary label keys: classes by number, nnU-Net region keys such as ``"(1, 2)"`` after them."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def stratum(scores: Mapping[str, Any]) -> str | None:
    """The object-size stratum of one case and label from its counts (None: empty reference or no counts)."""
    if not _has_counts(scores) or any(scores.get(name) is None for name in ("TP", "FP", "FN", "TN")):
        return None
    return size_stratum(scores["n_ref"], sum(int(scores[name]) for name in ("TP", "FP", "FN", "TN")))


def score_columns(nsd_tolerances_mm: float | Sequence[float] | str = DEFAULT_NSD_TOLERANCES_MM) -> dict[str, str]:
    """CSV column per score, with units and the NSD tolerance in the name (``NSD_1mm`` → ``nsd_1mm``)."""
    return {name: "hd95_mm" if name == "HD95" else name.lower() for name in score_names(nsd_tolerances_mm)}


def case_id(case: Mapping[str, Any]) -> str:
    """A case's name: its manifest id, else its reference file name without image extensions
    (``sub-01.nii.gz`` → ``sub-01``)."""
    if case.get("case_id"):
        return str(case["case_id"])
    name = volume_stem(str(case["reference_file"]))
    return name[: -len(".npy")] if name.endswith(".npy") else name


def write_per_case_csv(summary: Mapping[str, Any], path: str | Path,
                       label_names: Mapping[int | str, str] | None = None) -> Path:
    """Write one row per case and label: case, files, label, label_name, dice, iou, nsd_<t>mm per tolerance,
    hd95_mm, nnU-Net's TP, FP, FN, TN, n_pred, n_ref (voxels), empty_case (miss, false_positive, both_empty or
    empty), ref_fraction (n_ref over the volume's voxels) and size_stratum (small/medium/large, empty for an empty
    reference). NaN (undefined) scores are empty cells. Atomic."""
    names = {str(label): name for label, name in (label_names or {}).items()}
    columns = score_columns(summary_tolerances(summary))
    header = ["case", "reference_file", "prediction_file", "label", "label_name", *columns.values(), *COUNTS,
              "empty_case", "ref_fraction", "size_stratum"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for case in summary["metric_per_case"]:
        for label, scores in sorted(case["metrics"].items(), key=lambda item: int(item[0])):
            kind = empty_case(scores["n_pred"], scores["n_ref"]) if _has_counts(scores) else None
            size = stratum(scores)
            fraction = scores["n_ref"] / sum(scores[n] for n in ("TP", "FP", "FN", "TN")) if size else None
            writer.writerow([case_id(case), case["reference_file"], case["prediction_file"], label,
                             names.get(str(label), ""), *(csv_cell(scores.get(name)) for name in columns),
                             *("" if scores.get(name) is None else scores[name] for name in COUNTS), kind or "",
                             csv_cell(fraction), size or ""])
    return write_text(path, buffer.getvalue())


def summary_tolerances(summary: Mapping[str, Any]) -> tuple[float, ...]:
    """The NSD tolerances a summary was computed with (older summaries hold one ``nsd_tolerance_mm``)."""
    if summary.get("nsd_tolerances_mm"):
        return parse_tolerances(summary["nsd_tolerances_mm"])
    return parse_tolerances(summary.get("nsd_tolerance_mm", 2.0))


def read_summary(source: Path) -> dict:
    """The summary a folder (``<folder>/summary.json``) or a file names, checked for what a comparison needs; a
    UserError naming it otherwise. An older samadapt summary's single ``NSD`` score is renamed ``NSD_<t>mm``;
    an nnU-Net v2 summary.json is re-summarised with samadapt's rules (its Dice/IoU/counts per case; no surface
    metrics: ``"source": "nnU-Net"``)."""
    path = Path(source) / SUMMARY if Path(source).is_dir() else Path(source)
    if not path.is_file():
        raise UserError(f"{source}: no {SUMMARY} — run `samadapt evaluate ... out={source}` first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))  # nnU-Net writes NaN, which json reads
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}) — rerun the evaluation") from None
    if (
        not isinstance(summary, dict)
        or not isinstance(summary.get("mean"), dict)
        or not isinstance(summary.get("foreground_mean"), dict)
    ):
        raise UserError(f"{path}: no 'mean'/'foreground_mean' — not a samadapt or nnU-Net evaluation summary")
    if _is_nnunet(summary):
        return import_nnunet_summary(summary, path)
    if "nsd_tolerances_mm" not in summary:
        renamed = nsd_name(summary_tolerances(summary)[0])
        for means in (*summary["mean"].values(), summary["foreground_mean"]):
            if isinstance(means, dict) and "NSD" in means:
                means[renamed] = means.pop("NSD")
    return summary


def import_nnunet_summary(summary: Mapping[str, Any], path: Path) -> dict:
    """An nnU-Net v2 ``summary.json`` (``metric_per_case`` with Dice, IoU, TP, FP, FN, TN, n_pred, n_ref per
    label) as a samadapt summary: means and case counts recomputed with samadapt's rules (the same as nnU-Net's
    for Dice and IoU: both empty NaN, left out of the means), case ids from the reference file names, HD95/NSD
    NaN (nnU-Net has none)."""
    cases = summary.get("metric_per_case")
    if not isinstance(cases, list) or not all(isinstance(c, dict) and isinstance(c.get("metrics"), dict)
                                              and c.get("reference_file") for c in cases):
        raise UserError(f"{path}: nnU-Net summary without a 'metric_per_case' list of {{metrics, reference_file}} "
                        "— rerun nnUNetv2_evaluate_folder")
    converted = summarize([{**case, "case_id": case_id(case)} for case in cases])
    return {**converted, "source": NNUNET, "empty_penalty": None, "nsd_tolerances_mm": [],
            "label_names": {}, "rules": {"source": f"nnU-Net summary {path}: Dice, IoU and counts as nnU-Net "
                                                   "computed them; no HD95 or NSD"}}


def _is_nnunet(summary: Mapping[str, Any]) -> bool:
    """nnU-Net's summary.json: no samadapt fields and no surface metric in its means."""
    samadapt_keys = {"rules", "nsd_tolerances_mm", "nsd_tolerance_mm", "empty_penalty"}
    means = [m for m in summary["mean"].values() if isinstance(m, dict)]
    return not samadapt_keys & set(summary) and not any("HD95" in m or "NSD" in m for m in means)


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


def as_float(value: Any) -> float:
    """A score read from a summary as a float: None (JSON null) is NaN."""
    return math.nan if value is None else float(value)


def _has_counts(scores: Mapping[str, Any]) -> bool:
    return scores.get("n_pred") is not None and scores.get("n_ref") is not None


def nanmean(values: np.ndarray) -> float:
    """Mean ignoring NaN; NaN (without numpy's warning) when nothing is left."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def csv_cell(value: Any) -> str:
    """A score in a CSV cell: 6 significant digits, NaN / None as an empty cell."""
    value = as_float(value)
    return "" if math.isnan(value) else f"{value:.6g}"
