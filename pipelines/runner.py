"""``samadapt run PIPELINE``: chain stages, skip the ones that are up to date, resume crashed ones.

A pipeline YAML::

    name: demo                      # runs go to runs/<name>/<stage>/
    defaults: {arch: vit_tiny}      # applied to every stage whose command has the key
    matrix:                         # optional: stages that use ${matrix.X} run once per cell
      arch: [vit_b, vit_l]
    stages:
      pretrain: {command: pretrain, config: {data: "demo:ssl", steps: 100}}
      finetune: {command: finetune, config: {checkpoint: "${pretrain.sam_checkpoint}", arch: "${matrix.arch}"}}
      evaluate: {command: evaluate, config: {model: "${finetune.dir}"}}
    compare: [evaluate]             # evaluate stages (or their base names) to tabulate at the end, or
    # compare: {runs: [evaluate_base, evaluate_ssl, nnunet/summary.json], reference: evaluate_base, over: [seed]}

``${stage.dir}`` is a stage's folder, ``${stage.<artifact>}`` one of its files (the registry's artifacts). A stage is
*up to date* when its ``stage_output.json`` holds the same resolved config and the same sha256 of every
input; then it is skipped. Otherwise it runs — and resumes from ``state/step_<N>/`` when its previous run
with the same config was killed (the stages' shared training loop does that). Changing a stage changes
its outputs' hashes, so everything downstream reruns too.

``compare:`` (see :mod:`samadapt.pipelines.comparison`) lists evaluate stages and summary.json files (nnU-Net's
too); ``reference:`` names the run the others are paired against (Wilcoxon, bootstrap CI; default the first);
matrix cells differing only in the ``over:`` axes (default ``seed``, ``fold``) are replicates of one method,
reported as mean ± std. It writes ``runs/<name>/compare.md``, ``.csv``, ``_paired.csv`` and ``.png``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from samadapt.config import build, iter_keys, parse_overrides, read_yaml, to_dict
from samadapt.cost import finetune_cost_line
from samadapt.errors import UserError
from samadapt.io import write_json
from samadapt.pipelines.comparison import check_compare, compare_stages
from samadapt.stage_record import check_output, discard_states, is_main_process, stage_status, versions
from samadapt.stages import STAGES

PIPELINE_KEYS = {"name", "defaults", "matrix", "stages", "compare", "description"}
STAGE_KEYS = {"command", "config"}
REF = re.compile(r"\$\{([^}]+)\}")
# Pipeline, stage and matrix-cell names become folder names under the runs folder: plain names only, so no
# name can write outside it (``..``, ``/``) or hide (a leading dot).
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def check_name(name: str, what: str, source: Path) -> str:
    """``name`` if it is a plain folder name, else a UserError naming ``what`` it is."""
    if not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise UserError(
            f"{source}: {what} {name!r} is not a plain folder name (letters, digits, _ . + = -; no / or ..)"
        )
    return name


@dataclass
class Stage:
    """One stage to run: a YAML stage, or one matrix cell of it."""

    name: str  # "finetune" or "finetune/vit_b-lora"
    base: str  # the YAML stage name
    command: str
    raw: dict[str, Any]
    cell: dict[str, Any] | None
    out: Path
    deps: list[str] = field(default_factory=list)


def locate(pipeline: str) -> Path:
    """A YAML path, or the name of a packaged pipeline (``demo`` → samadapt/pipelines/demo.yaml)."""
    path = Path(pipeline)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: pipeline file not found")
        return path
    packaged = resources.files("samadapt.pipelines").joinpath(f"{pipeline}.yaml")
    if not packaged.is_file():
        names = sorted(p.name[:-5] for p in resources.files("samadapt.pipelines").iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"{pipeline!r}: no such pipeline file or packaged pipeline (packaged: {', '.join(names)})")
    return Path(str(packaged))


def _cell_id(cell: dict[str, Any]) -> str:
    """``vit_b-lora``: each axis value, or for a mapping its ``name`` (else its values joined by ``_``)."""

    def part(value: Any) -> str:
        if isinstance(value, dict):
            return str(value["name"]) if "name" in value else "_".join(str(v) for v in value.values())
        return str(value)

    return "-".join(part(v) for v in cell.values())


def _refs(value: Any) -> list[str]:
    if isinstance(value, str):
        return REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def plan(spec: dict[str, Any], source: Path, root: Path) -> list[Stage]:
    """Expand matrix cells and order stages so every stage follows the stages it references."""
    unknown = set(spec) - PIPELINE_KEYS
    if unknown:
        raise UserError(f"{source}: unknown top-level key(s) {sorted(unknown)} — allowed: {sorted(PIPELINE_KEYS)}")
    stages = spec.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{source}: 'stages' must map stage names to {{command, config}}")
    matrix = spec.get("matrix") or {}
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise UserError(f"{source}: 'matrix' must map each axis name to a non-empty list of values")
    cells = [dict(zip(matrix, combo)) for combo in itertools.product(*matrix.values())] if matrix else []
    cell_names: dict[str, dict[str, Any]] = {}
    for cell in cells:
        cell_id = check_name(_cell_id(cell), "matrix cell", source)
        if cell_id in cell_names:
            raise UserError(
                f"{source}: matrix cells {cell_names[cell_id]} and {cell} are both named {cell_id!r} — give "
                "the mapping values distinct 'name' fields"
            )
        cell_names[cell_id] = cell
    check_compare(spec.get("compare"), stages, source)
    deps: dict[str, set[str]] = {}
    for name, body in stages.items():
        check_name(str(name), "stage name", source)
        if not isinstance(body, dict) or set(body) - STAGE_KEYS or body.get("command") not in STAGES:
            raise UserError(
                f"{source}: stage {name!r} needs command: one of {sorted(STAGES)} and an optional config mapping"
            )
        deps[name] = set()
        for ref in _refs(body.get("config") or {}):
            head = ref.split(".")[0]
            if head == "matrix":
                _check_matrix_ref(ref, matrix, f"{source}: stage {name!r}")
            elif head not in stages:
                raise UserError(f"{source}: stage {name!r} references unknown stage ${{{ref}}}")
            else:
                deps[name].add(head)
    order = _topological(deps, source)
    per_cell = {}
    for name in order:
        per_cell[name] = any(r.startswith("matrix.") for r in _refs(stages[name].get("config") or {})) or any(
            per_cell[d] for d in deps[name]
        )
    planned: list[Stage] = []
    for name in order:
        body = stages[name]
        for cell in cells if per_cell[name] else [None]:
            suffix = f"/{_cell_id(cell)}" if cell else ""
            planned.append(
                Stage(
                    name=name + suffix,
                    base=name,
                    command=body["command"],
                    raw=dict(body.get("config") or {}),
                    cell=cell,
                    out=root / (name + suffix),
                    deps=[d + (suffix if per_cell[d] else "") for d in sorted(deps[name])],
                )
            )
    return planned


def _check_matrix_ref(ref: str, matrix: dict[str, list], where: str) -> None:
    """``matrix.AXIS`` or ``matrix.AXIS.FIELD`` where every value of that axis is a mapping with FIELD."""
    parts = ref.split(".")
    if len(parts) < 2 or parts[1] not in matrix:
        raise UserError(f"{where} uses ${{{ref}}} but the matrix has no such axis (axes: {', '.join(matrix)})")
    values = matrix[parts[1]]
    if len(parts) == 2 and any(isinstance(v, dict) for v in values):
        raise UserError(
            f"{where} uses ${{{ref}}} but matrix axis {parts[1]!r} holds mappings — name a field, "
            f"e.g. ${{{ref}.{next(iter(next(v for v in values if isinstance(v, dict))), 'name')}}}"
        )
    if len(parts) > 3 or (len(parts) == 3 and not all(isinstance(v, dict) and parts[2] in v for v in values)):
        raise UserError(
            f"{where} uses ${{{ref}}}: not every value of matrix axis {parts[1]!r} has a field {'.'.join(parts[2:])!r}"
        )


def _topological(deps: dict[str, set[str]], source: Path) -> list[str]:
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise UserError(f"{source}: stages reference each other in a cycle: {' → '.join(chain + [name])}")
        state[name] = "visiting"
        for dep in sorted(deps[name]):
            visit(dep, chain + [name])
        state[name] = "done"
        order.append(name)

    for name in deps:
        visit(name, [])
    return order


def resolve_config(stage: Stage, by_name: dict[str, Stage], defaults: dict[str, Any], overrides: dict[str, str]) -> Any:
    """The stage's config object: defaults < YAML config < key=value < stage.key=value, refs resolved."""
    config_cls = STAGES[stage.command].config_class()
    known = {name for name, _ in iter_keys(config_cls)}
    values = {k: v for k, v in defaults.items() if k in known}
    values.update(_flatten(stage.raw))
    values.update({k: v for k, v in overrides.items() if k in known})
    prefix = stage.base + "."
    values.update({k[len(prefix) :]: v for k, v in overrides.items() if k.startswith(prefix)})
    values = {k: _substitute(v, stage, by_name) for k, v in values.items()}
    values["out"] = str(stage.out)
    return build(config_cls, values)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + name + "."))
        else:
            flat[prefix + name] = value
    return flat


def _substitute(value: Any, stage: Stage, by_name: dict[str, Stage]) -> Any:
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        parts = match.group(1).split(".")
        if parts[0] == "matrix":
            found: Any = stage.cell
            for part in parts[1:]:
                found = found[part]
            return str(found)
        upstream = next(by_name[d] for d in stage.deps if by_name[d].base == parts[0])
        provided = STAGES[upstream.command]
        if len(parts) != 2 or (parts[1] != "dir" and parts[1] not in provided.artifacts):
            raise UserError(
                f"stage {stage.name}: ${{{match.group(1)}}} — {upstream.command} stages provide "
                f"{', '.join(['dir', *provided.artifacts])}"
            )
        return str(upstream.out if parts[1] == "dir" else provided.path(upstream.out, parts[1]))

    full = REF.fullmatch(value)
    return replace(full) if full else REF.sub(replace, value)


def _say(text: str) -> None:
    if is_main_process():
        print(text, flush=True)


def _select(stages: list[Stage], start: str | None, until: str | None) -> list[Stage]:
    def index(name: str, last: bool) -> int:
        hits = [i for i, s in enumerate(stages) if name in (s.name, s.base)]
        if not hits:
            raise UserError(f"no stage named {name!r} — stages: {', '.join(s.name for s in stages)}")
        return hits[-1] if last else hits[0]

    first = index(start, last=False) if start else 0
    last = index(until, last=True) if until else len(stages) - 1
    return stages[first : last + 1]


def run_pipeline(
    pipeline: str,
    overrides: list[str],
    start: str | None = None,
    until: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    runs_dir: str | None = None,
    cost: bool = False,
) -> dict[str, str]:
    """Run (or with ``dry_run`` list, with ``cost`` each fine-tune's estimated cost) the selected stages;
    returns {stage name: what happened}."""
    source = locate(pipeline)
    spec = read_yaml(source)
    name = check_name(str(spec.get("name") or source.stem), "pipeline name", source)
    root = Path(runs_dir) if runs_dir else Path("runs") / name
    stages = plan(spec, source, root)
    by_name = {s.name: s for s in stages}
    parsed = parse_overrides(overrides)
    _check_overrides(parsed, stages)
    selected = _select(stages, start, until)
    configs = {s.name: resolve_config(s, by_name, spec.get("defaults") or {}, parsed) for s in stages}
    if not dry_run and is_main_process():  # the bundle first: it explains a run that fails half-way too
        write_json(
            root / "pipeline.json",
            {
                "pipeline": str(source),
                "spec": spec,
                "versions": versions(),
                "stages": {n: to_dict(c) for n, c in configs.items()},
            },
        )
    outcome: dict[str, str] = {}
    for stage in stages:
        config = configs[stage.name]
        status = stage_status(stage.command, config)
        if dry_run and status != "run" and any(outcome.get(d, "up to date") != "up to date" for d in stage.deps):
            status = "run"  # an upstream stage will run and change this stage's inputs
        if stage not in selected:
            if status != "up to date" and not dry_run and any(s.name in _downstream(stage, stages) for s in selected):
                raise UserError(f"stage {stage.name} (before --from) is not complete — run it first or drop --from")
            continue
        if force and status != "run":
            status = "run (forced)"
            if not dry_run:  # a forced rerun starts over, it does not resume (every process: before its barrier)
                check_output(stage.command, stage.out)  # only a folder this stage wrote loses its states
                discard_states(stage.out)
        outcome[stage.name] = status
        if dry_run:  # a fine-tune's training FLOPs and GPU time on paper (samadapt.cost), on its own line's end
            estimate = f"  {finetune_cost_line(config)}" if cost and stage.command == "finetune" else ""
            _say(f"{stage.name:<40} {stage.command:<9} {status:<13} {stage.out}{estimate}")
            continue
        if status == "up to date":
            _say(f"[{stage.name}] up to date — skipped")
            continue
        _say(f"[{stage.name}] {'resuming' if status == 'resume' else 'running'} {stage.command} → {stage.out}")
        result = STAGES[stage.command].run_function()(config)
        if result is not None and not getattr(result, "ok", True):
            raise UserError(f"stage {stage.name} failed — see {stage.out}")
    if not dry_run and is_main_process():
        compare_stages(spec, stages, root, source, _cell_id, _say)
    return outcome


def _downstream(stage: Stage, stages: list[Stage]) -> set[str]:
    found, changed = {stage.name}, True
    while changed:
        changed = False
        for other in stages:
            if other.name not in found and found & set(other.deps):
                found.add(other.name)
                changed = True
    return found - {stage.name}


def _check_overrides(overrides: dict[str, str], stages: list[Stage]) -> None:
    bases = {s.base for s in stages}
    known = {k for s in stages for k, _ in iter_keys(STAGES[s.command].config_class())}
    for key in overrides:
        head, _, rest = key.partition(".")
        if head in bases and rest:
            continue
        if key not in known:
            raise UserError(
                f"override {key}=: no stage of this pipeline has that key (use <stage>.<key>= for one stage)"
            )
