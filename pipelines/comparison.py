"""A pipeline's ``compare:`` key: which evaluations end up in ``runs/<name>/compare.*`` and how they are grouped.

Two forms::

    compare: [evaluate_base, evaluate_ssl]          # stage names (a matrix stage's base name takes every cell)
    compare:
      runs: [evaluate_base, evaluate_ssl, nnunet/summary.json]   # + summary.json files (nnU-Net's too)
      reference: evaluate_base                      # what the others are paired against (default: the first)
      over: [seed, fold]                            # matrix axes whose cells are replicates (the default)

Matrix cells that differ only in the ``over`` axes are one group (``evaluate_ssl/0`` and ``evaluate_ssl/1`` of
``matrix: {seed: [0, 1]}`` are ``evaluate_ssl``): mean ± std over them, and each cell paired with the reference's
cell of the same replicate (``seed=0`` with ``seed=0``; see :mod:`samadapt.compare`). A ``.json`` entry is a
file path relative to the pipeline YAML's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from samadapt.errors import UserError
from samadapt.stage_record import STAGE_OUTPUT
from samadapt.stages import STAGES

COMPARE_KEYS = {"runs", "reference", "over"}
DEFAULT_OVER = ("seed", "fold")


def parse_compare(compare: Any, source: Path) -> tuple[list[str], str | None, tuple[str, ...]]:
    """``(runs, reference, over)`` of a ``compare:`` value (None: nothing to compare)."""
    if compare is None:
        return [], None, DEFAULT_OVER
    spec = compare if isinstance(compare, dict) else {"runs": compare}
    unknown = set(spec) - COMPARE_KEYS
    if unknown:
        raise UserError(f"{source}: compare has unknown key(s) {sorted(unknown)} — allowed: {sorted(COMPARE_KEYS)}")
    runs = spec.get("runs")
    runs = [runs] if isinstance(runs, str) else runs
    if not isinstance(runs, list) or not runs or not all(isinstance(n, str) for n in runs):
        raise UserError(f"{source}: compare must be an evaluate stage's name or a list of them (or a mapping with "
                        f"runs: [...], reference: NAME, over: [AXIS...]), got {compare!r}")
    reference, over = spec.get("reference"), spec.get("over", list(DEFAULT_OVER))
    if reference is not None and not isinstance(reference, str):
        raise UserError(f"{source}: compare.reference must be one run's name, got {reference!r}")
    if not isinstance(over, list) or not all(isinstance(axis, str) for axis in over):
        raise UserError(f"{source}: compare.over must be a list of matrix axis names, got {over!r}")
    return runs, reference, tuple(over)


def check_compare(compare: Any, stages: dict[str, Any], source: Path) -> None:
    """Checked before any stage runs: every run is a stage that writes a summary.json (evaluate) or an existing
    summary file, and the reference is one of the runs."""
    runs, reference, _ = parse_compare(compare, source)
    for name in runs:
        if name.endswith(".json"):
            if not (source.parent / name).is_file():
                raise UserError(f"{source}: compare lists {name!r}, but {source.parent / name} is no file")
            continue
        base = name.split("/")[0]
        command = (stages.get(base) or {}).get("command")
        if command not in STAGES or "summary" not in STAGES[command].artifacts:
            raise UserError(f"{source}: compare lists {name!r}, which is not an evaluate stage of this pipeline")
    if reference is not None and not any(reference in (name, name.split("/")[0]) or name.startswith(reference + "/")
                                         for name in runs):
        raise UserError(f"{source}: compare.reference {reference!r} is none of the compared runs ({', '.join(runs)})")


def group_name(stage: Any, over: tuple[str, ...], cell_id: Callable[[dict], str]) -> str:
    """A stage's group: its base name plus the id of its matrix cell without the replicate axes."""
    kept = {axis: value for axis, value in (stage.cell or {}).items() if axis not in over}
    return stage.base + (f"/{cell_id(kept)}" if kept else "")


def compare_stages(spec: dict[str, Any], stages: list, root: Path, source: Path, cell_id: Callable[[dict], str],
                   say: Callable[[str], None]) -> None:
    """Write ``root/compare.*`` from the finished stages ``compare:`` names (skipped while one is unfinished)."""
    runs, reference, over = parse_compare(spec.get("compare"), source)
    def position(stage: Any) -> int | None:  # the table follows the order compare: lists the runs in
        return next((i for i, name in enumerate(runs) if name in (stage.name, stage.base)), None)

    chosen = sorted((s for s in stages if position(s) is not None), key=position)
    files = [name for name in runs if name.endswith(".json")]
    if not chosen and not files:
        return
    if not all((s.out / STAGE_OUTPUT).is_file() for s in chosen):
        say("compare: skipped — not every compared evaluate stage has finished")
        return
    from samadapt.compare import compare_runs

    groups = [group_name(s, over, cell_id) for s in chosen]
    if reference is not None and reference not in groups + files:
        # a stage name picks its group; a base name must pick exactly one
        named = {g for s, g in zip(chosen, groups) if reference in (s.name, s.base)}
        if len(named) != 1:
            raise UserError(f"{source}: compare.reference {reference!r} is {len(named)} groups "
                            f"({', '.join(sorted(named)) or 'none'}) — name one of {', '.join(dict.fromkeys(groups))}")
        reference = named.pop()
    replicates = [",".join(f"{axis}={cell_id({axis: s.cell[axis]})}" for axis in over if axis in (s.cell or {}))
                  or None for s in chosen]
    markdown = compare_runs([*(s.out for s in chosen), *(source.parent / f for f in files)], root / "compare",
                            names=[*(s.name for s in chosen), *files], groups=[*groups, *files], reference=reference,
                            replicates=[*replicates, *(None for _ in files)])
    say(f"\n{markdown}\nwritten: {root / 'compare.md'} (+ _paired.csv, .csv, .png)")
