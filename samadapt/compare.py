"""Comparison of evaluation runs: means ± std over seeds/folds, paired per-case statistics, a per-case plot.

Inputs are ``summary.json`` files (samadapt's, older samadapt ones, or nnU-Net v2's, which has Dice/IoU and the
counts but no HD95/NSD) named by an evaluate folder or the file itself. Runs that are replicates of one method
(seeds, folds) share a *group*; every number below is per group and class:

- ``mean ± std``: the mean over the group's runs of each run's mean (nnU-Net-style means over cases), and the
  sample standard deviation (ddof 1) of those run means; counts (misses, ...) are summed over the runs.
- Per-case values of a group: a case's score averaged over the group's runs that have the case (seeds: every
  run; folds: the one fold that holds it), NaN-ignoring.
- Paired against the reference group, case by case (matched by case id; a case the reference has and a group
  lacks is an error naming it; a score NaN on either side leaves that pair out). When both groups hold the same
  replicates (every run names one, e.g. ``seed=0``, as pipelines and ``--group`` do), a pair is one case in one
  replicate — seed 0 against the reference's seed 0 — rather than the case's average over replicates, so three
  seeds on one test case are three pairs, not one. Per pair: the mean difference
  (group − reference), its bootstrap 95 % CI (percentile method, :data:`BOOTSTRAP_RESAMPLES` resamples of the
  pairs, numpy generator seeded with :data:`BOOTSTRAP_SEED`) and the two-sided Wilcoxon signed-rank p
  (``scipy.stats.wilcoxon``, zero differences dropped; no p when every difference is zero), and how many pairs
  got better / worse / tied (for HD95 lower is better).

Writes ``<prefix>.md`` (both tables and the empty-case rule), ``<prefix>.csv`` (means), ``<prefix>_paired.csv``
(statistics) and ``<prefix>.png`` (per-case Dice of each group: box plot with every case as a point).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import wilcoxon

from samadapt.errors import UserError
from samadapt.io import atomic_path, write_text
from samadapt.metrics import DEFAULT_NSD_TOLERANCES_MM, mm
from samadapt.report import (
    NNUNET,
    OVERLAY_DPI,
    as_float,
    case_id,
    csv_cell,
    label_order,
    nanmean,
    read_summary,
    score_columns,
    summary_tolerances,
)

FOREGROUND = "foreground"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
# Case counts per class: (key in summary["mean"][label], Markdown header, CSV column).
CASE_COUNTS = (("n_miss", "misses", "misses"), ("n_false_positive", "FP on empty", "false_positives_on_empty"),
               ("n_both_empty", "both empty", "both_empty"), ("HD95", "HD95 n/a", "hd95_missing"))
EMPTY_RULE_NOTES = {
    True: "Misses and false positives on an empty reference score HD95 = image diagonal, NSD = 0 "
          "(empty_penalty=true); both empty: excluded from the means.",
    False: "Misses, false positives on an empty reference and both-empty cases are excluded from the HD95 and "
           "NSD means (empty_penalty=false): fewer cases behind those means.",
    None: "Summaries written before the empty-case rules: a miss or a false positive has no HD95 and the mean "
          "skips it.",
    NNUNET: "nnU-Net summaries: Dice and IoU as nnU-Net computed them (both empty: excluded from the means).",
}
NNUNET_NOTE = "nnU-Net rows have no HD95 or NSD (nnU-Net's summary.json holds none)."


@dataclass
class Run:
    """One evaluation: its name, its group (the method it is a replicate of) and its summary."""

    name: str
    group: str
    source: Path
    summary: dict
    replicate: str | None = None


def compare_runs(sources: Sequence[str | Path], out_prefix: str | Path, names: Sequence[str] | None = None,
                 label_names: Mapping[int | str, str] | None = None, groups: Sequence[str] | None = None,
                 reference: str | None = None, replicates: Sequence[str | None] | None = None) -> str:
    """Compare evaluation runs (see the module docstring); returns the Markdown, also written to ``<prefix>.md``.

    sources: evaluate folders or summary.json files (samadapt's or nnU-Net's); names: one per source (default:
    the folder names); groups: one per source, runs with the same group are replicates (default: each run its
    own group); reference: the group (or a run of it) the others are paired against (default: the first);
    replicates: one per source, which replicate of its group a run is (``seed=1``; None: unknown).
    Runs scored with other empty-case rules are refused; NSD is shown at the tolerances every run has."""
    sources = [Path(s) for s in sources]
    names = list(names) if names is not None else default_names(sources)
    groups = list(groups) if groups is not None else names
    replicates = list(replicates) if replicates is not None else [None] * len(sources)
    if not len(names) == len(groups) == len(sources) == len(replicates):
        raise UserError(f"compare: {len(names)} names and {len(groups)} groups for {len(sources)} evaluations — "
                        "give one name per folder")
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise UserError(f"compare: run name {doubled[0]!r} is given twice — name each run once (replicates: groups)")
    runs = [Run(name, group, source, read_summary(source), replicate)
            for name, group, source, replicate in zip(names, groups, sources, replicates)]
    surface = [run for run in runs if run.summary.get("source") != NNUNET]
    tolerances = _common_tolerances(surface) if surface else DEFAULT_NSD_TOLERANCES_MM
    penalty = _common_penalty(surface) if surface else NNUNET
    if label_names is None:  # the names the evaluations recorded from their manifests' labels.json
        label_names = {k: v for run in runs for k, v in (run.summary.get("label_names") or {}).items()}
    label_names = {str(label): name for label, name in label_names.items()}
    labels = sorted({label for run in runs for label in run.summary["mean"]}, key=label_order)
    columns = score_columns(tolerances)
    order = list(dict.fromkeys(groups))
    members = {group: [run for run in runs if run.group == group] for group in order}
    chosen = _reference_group(reference, order, runs)
    per_case = {group: group_cases(members[group], columns) for group in order}
    rows = [row for group in order for row in _mean_rows(group, members[group], labels, columns)]
    paired = [row for group in order if group != chosen
              for row in _paired_rows(group, chosen,
                                      *_pairing_units(members[group], members[chosen], per_case, columns),
                                      labels, columns)]

    notes = EMPTY_RULE_NOTES[penalty] + (f" {NNUNET_NOTE}" if surface and len(surface) < len(runs) else "")
    text = _markdown(rows, paired, chosen, columns, tolerances, label_names, notes)
    write_text(Path(f"{out_prefix}.md"), text)
    _write_means_csv(Path(f"{out_prefix}.csv"), rows, columns, label_names)
    _write_paired_csv(Path(f"{out_prefix}_paired.csv"), paired, label_names)
    _write_case_plot(Path(f"{out_prefix}.png"), order, per_case, [label for label in labels if label != "0"],
                     label_names)
    return text


def group_cases(runs: Sequence[Run], columns: Mapping[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{case id: {label: {score: value}}}`` of a group: each score averaged over the runs that have the case
    (NaN-ignoring; NaN when no run has a defined value). A case listed twice in one run is an error."""
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        seen = set()
        for case in run.summary.get("metric_per_case", []):
            name = case_id(case)
            if name in seen:
                raise UserError(f"{run.source}: case {name!r} is listed twice — one entry per case")
            seen.add(name)
            for label, scores in case["metrics"].items():
                slot = values.setdefault(name, {}).setdefault(str(label), {score: [] for score in columns})
                for score in columns:
                    slot[score].append(as_float(scores.get(score)))
    return {name: {label: {score: nanmean(np.array(v)) for score, v in scores.items()}
                   for label, scores in labels.items()}
            for name, labels in values.items()}


def paired_statistics(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """Mean of paired differences, its bootstrap CI (percentile, ``CI_LEVEL``) and the Wilcoxon signed-rank p.

    differences: one value per case (NaN-free). Returns ``{"mean", "ci_low", "ci_high", "p"}``; NaN where
    undefined (no differences; p also when every difference is zero)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    p = float(wilcoxon(d).pvalue) if np.count_nonzero(d) else math.nan
    return {"mean": float(d.mean()), "ci_low": float(low), "ci_high": float(high), "p": p}


def groups_by_pattern(names: Sequence[str], pattern: str) -> list[str]:
    """Group names: each run name with the first match of the regex ``pattern`` removed (``seed=\\d+`` makes
    ``evaluate@seed=1`` and ``evaluate@seed=2`` one group ``evaluate@``, trailing separators trimmed)."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--group {pattern!r}: not a valid regular expression ({exc})") from None
    return [regex.sub("", name, count=1).strip("/-_@.=") or name for name in names]


def replicates_by_pattern(names: Sequence[str], pattern: str) -> list[str | None]:
    """Each run's replicate under :func:`groups_by_pattern`: the text ``pattern`` matched (``seed=1``), or None."""
    regex = re.compile(pattern)
    return [match.group(0) if (match := regex.search(name)) else None for name in names]


def _reference_group(reference: str | None, order: Sequence[str], runs: Sequence[Run]) -> str:
    if reference is None:
        return order[0]
    if reference in order:
        return reference
    found = next((run.group for run in runs if run.name == reference), None)
    if found is None:
        raise UserError(f"compare: reference {reference!r} is none of the runs ({', '.join(order)})")
    return found


def _mean_rows(group: str, runs: Sequence[Run], labels: Sequence[str], columns: Mapping[str, str]) -> list[dict]:
    """Per class (and the foreground mean): mean ± std over the runs of their means, summed counts."""
    rows = []
    for label in [*labels, FOREGROUND]:
        having = [run for run in runs if label == FOREGROUND or label in run.summary["mean"]]
        if not having:
            continue
        means = [run.summary["foreground_mean"] if label == FOREGROUND else run.summary["mean"][label]
                 for run in having]
        per_run = {score: np.array([as_float(m.get(score)) for m in means]) for score in columns}
        counts = [_class_counts(run.summary, label) for run in having]
        rows.append({
            "run": group, "label": label, "runs": len(having), "sources": [str(run.source) for run in having],
            "cases": sum(len(run.summary.get("metric_per_case", [])) for run in having),
            "mean": {score: nanmean(values) for score, values in per_run.items()},
            "std": {score: _std(values) for score, values in per_run.items()},
            "counts": [None if any(c[i] is None for c in counts) else sum(c[i] for c in counts)
                       for i in range(len(CASE_COUNTS))],
        })
    return rows


def _class_counts(summary: Mapping[str, Any], label: str) -> list[int | None]:
    """misses, FP on empty, both-empty, cases without HD95 of a class or summed over the foreground classes."""
    if label != FOREGROUND:
        means = summary["mean"][label]
        return [means.get("n_nan", {}).get(key, 0) if key == "HD95" else means.get(key) for key, _, _ in CASE_COUNTS]
    each = [_class_counts(summary, other) for other in summary["mean"] if other != "0"]
    return [None if any(c[i] is None for c in each) else sum(c[i] for c in each) for i in range(len(CASE_COUNTS))]


def _pairing_units(ours: Sequence[Run], theirs: Sequence[Run], per_case: Mapping[str, dict],
                   columns: Mapping[str, str]) -> tuple[dict, dict, str]:
    """Both groups' scores per pairing unit, and what a unit is: ``case @ replicate`` when both groups hold the
    same replicates, each once; else ``case``, a case averaged over its group's runs (``per_case``)."""
    names = [[run.replicate for run in group] for group in (ours, theirs)]
    if not (all(None not in n and len(set(n)) == len(n) for n in names) and set(names[0]) == set(names[1])):
        return per_case[ours[0].group], per_case[theirs[0].group], "case"

    def units(group: Sequence[Run]) -> dict:
        return {f"{case} @ {run.replicate}": scores for run in group
                for case, scores in group_cases([run], columns).items()}
    return units(ours), units(theirs), "case @ replicate"


def _paired_rows(group: str, reference: str, ours: Mapping[str, dict], theirs: Mapping[str, dict],
                 paired_by: str, labels: Sequence[str], columns: Mapping[str, str]) -> list[dict]:
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise UserError(f"compare: {group} has no case {missing[0]!r} that the reference {reference} has"
                        + (f" ({len(missing)} cases missing)" if len(missing) > 1 else "")
                        + " — evaluate every run on the same cases (same manifest and split)")
    rows = []
    for label in labels:
        if label == "0":
            continue
        for score in columns:
            pairs = [(ours[c][label][score], theirs[c][label][score]) for c in sorted(theirs)
                     if label in ours[c] and label in theirs[c]]
            pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
            d = np.array([a - b for a, b in pairs], dtype=np.float64)
            gain = -d if score == "HD95" else d  # > 0: this run is better than the reference
            rows.append({"run": group, "reference": reference, "label": label, "score": score, "pairs": len(pairs),
                         "paired_by": paired_by,
                         **paired_statistics(d), "better": int((gain > 0).sum()), "worse": int((gain < 0).sum()),
                         "tied": int((gain == 0).sum())})
    return rows


def _markdown(rows: Sequence[dict], paired: Sequence[dict], reference: str, columns: Mapping[str, str],
              tolerances: Sequence[float], label_names: Mapping[str, str], notes: str) -> str:
    nsd_headers = " | ".join(f"NSD ({mm(t)} mm)" for t in tolerances)
    lines = [
        f"| run | runs | class | cases | Dice | IoU | {nsd_headers} | HD95 (mm) | "
        + " | ".join(shown for _, shown, _ in CASE_COUNTS) + " |",
        "|" + "---|" * (7 + len(tolerances) + len(CASE_COUNTS)),
    ]
    lines += [
        f"| {row['run']} | {row['runs']} | {_class(row['label'], label_names)} | {row['cases']} | "
        + " | ".join(_mean_std(row["mean"][s], row["std"][s], s) for s in columns) + " | "
        + " | ".join("—" if count is None else str(count) for count in row["counts"]) + " |"
        for row in rows
    ]
    lines += ["", "Means over cases per run; with several runs (seeds, folds): mean ± std over the runs' means. "
              + notes]
    if paired:
        lines += [
            "", f"Paired against **{reference}** (run − reference; a pair is one case — `case @ replicate`: in the "
            "same seed or fold of both, `case`: averaged over each group's runs — matched by id, a score undefined "
            f"in either run left out; {CI_LEVEL:.0%} CI: bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed "
            f"{BOOTSTRAP_SEED}; p: two-sided Wilcoxon signed-rank; better/worse/tied: pairs, HD95 lower is better):",
            "",
            "| run | class | score | paired by | pairs | mean diff | 95 % CI | Wilcoxon p | better | worse | tied |",
            "|" + "---|" * 11,
        ]
        lines += [
            f"| {row['run']} | {_class(row['label'], label_names)} | {row['score']} | {row['paired_by']} | "
            f"{row['pairs']} | "
            f"{_signed(row['mean'], row['score'])} | {_interval(row['ci_low'], row['ci_high'], row['score'])} | "
            f"{_p(row['p'])} | {row['better']} | {row['worse']} | {row['tied']} |"
            for row in paired
        ]
    return "\n".join(lines) + "\n"


def _write_means_csv(path: Path, rows: Sequence[dict], columns: Mapping[str, str],
                     label_names: Mapping[str, str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "runs", "eval_dirs", "label", "label_name", "cases",
                     *(name for column in columns.values() for name in (column, f"{column}_std")),
                     *(column for _, _, column in CASE_COUNTS)])
    for row in rows:
        writer.writerow([row["run"], row["runs"], ";".join(row["sources"]), row["label"],
                         label_names.get(row["label"], ""), row["cases"],
                         *(csv_cell(row[kind][s]) for s in columns for kind in ("mean", "std")),
                         *("" if c is None else c for c in row["counts"])])
    write_text(path, buffer.getvalue())


def _write_paired_csv(path: Path, rows: Sequence[dict], label_names: Mapping[str, str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "reference", "label", "label_name", "score", "paired_by", "pairs", "mean_difference",
                     "ci_low", "ci_high", "wilcoxon_p", "better", "worse", "tied"])
    for row in rows:
        writer.writerow([row["run"], row["reference"], row["label"], label_names.get(row["label"], ""),
                         row["score"], row["paired_by"], row["pairs"],
                         *(csv_cell(row[k]) for k in ("mean", "ci_low", "ci_high", "p")),
                         row["better"], row["worse"], row["tied"]])
    write_text(path, buffer.getvalue())


def _write_case_plot(path: Path, groups: Sequence[str], per_case: Mapping[str, dict], labels: Sequence[str],
                     label_names: Mapping[str, str]) -> None:
    """One panel per foreground class: a box of the groups' per-case Dice with every case drawn as a point."""
    labels = list(labels) or ["1"]
    fig = Figure(figsize=(max(4.0, 1.0 + 1.1 * len(groups)) * len(labels), 4.0), dpi=OVERLAY_DPI)
    rng = np.random.default_rng(0)  # horizontal jitter of the points only
    for ax, label in zip(fig.subplots(1, len(labels), squeeze=False)[0], labels):
        values = [np.array([scores[label]["Dice"] for scores in per_case[g].values() if label in scores])
                  for g in groups]
        values = [v[~np.isnan(v)] for v in values]
        ax.boxplot([v if v.size else [math.nan] for v in values], tick_labels=list(groups), showfliers=False)
        for index, v in enumerate(values, start=1):
            ax.plot(index + rng.uniform(-0.12, 0.12, v.size), v, "o", markersize=4, alpha=0.7)
        ax.set_title(f"class {_class(label, label_names)}", fontsize=9)
        ax.set_ylabel("Dice per case")
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _common_tolerances(runs: Sequence[Run]) -> tuple[float, ...]:
    """The NSD tolerances every run has (in the first run's order); a UserError when they share none."""
    each = [summary_tolerances(run.summary) for run in runs]
    common = tuple(t for t in each[0] if all(t in other for other in each[1:]))
    if not common:
        listed = ", ".join(f"{run.source}: {','.join(mm(t) for t in ts)} mm" for run, ts in zip(runs, each))
        raise UserError(f"compare: no NSD tolerance in common ({listed}) — re-evaluate with one nsd_tolerances_mm")
    return common


def _common_penalty(runs: Sequence[Run]) -> bool | None:
    """The runs' ``empty_penalty`` (None: a summary from before the rules); a UserError when they differ."""
    penalties = [run.summary.get("empty_penalty") for run in runs]
    if len(set(penalties)) > 1:
        shown = {True: "true", False: "false", None: "not recorded (older summary)"}
        listed = ", ".join(f"{run.source}: {shown[p]}" for run, p in zip(runs, penalties))
        raise UserError(f"compare: HD95/NSD rules for empty cases differ ({listed}) — re-evaluate with one "
                        "empty_penalty")
    return penalties[0]


def default_names(sources: Sequence[Path]) -> list[str]:
    """Folder names (a summary file: its folder's), with more parent folders while they do not tell runs
    apart (runs/a/evaluate)."""
    folders = [s if not s.name.endswith(".json") else s.parent for s in sources]
    for depth in range(1, max(len(d.resolve().parts) for d in folders) + 1):
        names = ["/".join(d.resolve().parts[-depth:]) for d in folders]
        if len(set(names)) == len(names):
            return names
    return [str(s) for s in sources]


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (ddof 1) of the defined values; NaN for fewer than two."""
    values = values[~np.isnan(values)]
    return float(values.std(ddof=1)) if values.size > 1 else math.nan


def _class(label: str, label_names: Mapping[str, str]) -> str:
    if label == FOREGROUND:
        return "foreground mean"
    return f"{label} ({label_names[label]})" if label in label_names else label


def _digits(score: str) -> int:
    return 2 if score == "HD95" else 4


def _mean_std(mean: float, std: float, score: str) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{_digits(score)}f}" + ("" if math.isnan(std) else f" ± {std:.{_digits(score)}f}")


def _signed(value: float, score: str) -> str:
    return "—" if math.isnan(value) else f"{value:+.{_digits(score)}f}"


def _interval(low: float, high: float, score: str) -> str:
    return "—" if math.isnan(low) else f"[{low:+.{_digits(score)}f}, {high:+.{_digits(score)}f}]"


def _p(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3g}"
