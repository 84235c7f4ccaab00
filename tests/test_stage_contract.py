"""The stage contract (issue 13): stage folders import only the core, the package has no import circle, each
artifact name and the state/ layout are spelled in one place, a stage folder's hash covers every artifact its
stage writes, and a run folder recorded before a config key existed still loads."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, run_cli

# Installed names of the card's folders (pyproject's package-dir).
PACKAGES = {"samadapt": "samadapt", "pretrain": "samadapt.pretrain", "finetune": "samadapt.finetune",
            "baseline": "samadapt.baseline", "evaluate": "samadapt.evaluate", "pipelines": "samadapt.pipelines",
            "data_manifests": "samadapt.data_manifests"}
STAGE_FOLDERS = ("pretrain", "finetune", "baseline", "evaluate", "pipelines")


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path], top_level_only: bool) -> list[tuple[int, str]]:
    """(line, imported samadapt module) for each import in ``path``; ``from pkg import sub`` counts sub."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("samadapt")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samadapt"):
            found.append((node.lineno, node.module))
            found += [
                (node.lineno, f"{node.module}.{a.name}") for a in node.names if f"{node.module}.{a.name}" in modules
            ]
    return [(line, name) for line, name in found if name in modules]


def test_stage_folders_import_only_the_core():
    modules = _modules()
    crossing = []
    for name, path in modules.items():
        own = name.split(".")[1] if name.count(".") and name.split(".")[1] in STAGE_FOLDERS else None
        for line, imported in _imports(path, modules, top_level_only=False):
            target = imported.split(".")[1] if imported.count(".") else None
            if target in STAGE_FOLDERS and target != own:
                where = "the core" if own is None else f"stage folder {own}"
                crossing.append(f"{path.relative_to(REPO)}:{line} ({where}) imports {imported}")
    assert len(modules) > 40 and not crossing, "\n".join(crossing)


def test_no_file_level_import_circle():
    modules = _modules()
    graph = {
        name: {i for _, i in _imports(path, modules, top_level_only=True) if i != name}
        for name, path in modules.items()
    }
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycles.append(" -> ".join(chain[chain.index(name) :] + [name]))
            return
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, chain + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
    assert sum(map(len, graph.values())) > 100 and not cycles, "\n".join(cycles)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String literals of ``path`` that are code: not docstrings, and not an artifact's registry key
    (``SPEC.path(out, "predictions")``, ``SPEC.artifacts["summary"]``), which may equal its file name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "path":
            skipped |= {id(arg) for arg in node.args[1:]}
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "artifacts":
            skipped.add(id(node.slice))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped
    ]


def test_each_artifact_name_and_the_state_layout_are_spelled_in_one_place():
    from samadapt.stage_record import PROGRESS_FILE, RUN_CONFIG, STAGE_OUTPUT
    from samadapt.stages import METRICS_FILE, STAGES, STATE_DIR, TENSORBOARD_DIR

    # "adapter" is also a strategy's name (encoder=adapter), so the folder name is not checked as a bare word.
    names = {n for spec in STAGES.values() for n in spec.artifacts.values() if n != "adapter"}
    names |= {STAGE_OUTPUT, RUN_CONFIG, PROGRESS_FILE, METRICS_FILE, STATE_DIR, TENSORBOARD_DIR}
    homes = {REPO / "samadapt" / "stages.py", REPO / "samadapt" / "stage_record.py"}
    spelled: dict[str, list[str]] = {name: [] for name in names}
    for folder in ("samadapt", *STAGE_FOLDERS):
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, text in _string_constants(path):
                if text in names:
                    spelled[text].append(f"{path.relative_to(REPO)}:{line}")
    outside = {name: [p for p in places if REPO / p.split(":")[0] not in homes] for name, places in spelled.items()}
    assert all(spelled.values()), [name for name, places in spelled.items() if not places]
    assert not any(outside.values()), {name: places for name, places in outside.items() if places}


# --- a real finetune folder: its hash and its recorded config -------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A one-step automatic-mode fine-tune from a random SAM (so the folder holds base_sam.safetensors)."""
    import nibabel as nib
    import numpy as np

    d = tmp_path_factory.mktemp("contract")
    rng = np.random.default_rng(1)
    image = (rng.random((32, 32, 8)) * 100).astype(np.float32)
    label = np.zeros((32, 32, 8), np.uint8)
    label[8:24, 8:24, 2:6] = 1
    image[label > 0] += 200
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(d / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(d / "lab.nii.gz"))
    rows = [
        {"id": i, "image": "img.nii.gz", "label": "lab.nii.gz", "modality": "MR", "split": s}
        for i, s in (("a", "train"), ("b", "test"))
    ]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = d / "finetune"
    run_cli(
        "finetune",
        f"data={d / 'm.jsonl'}",
        f"out={out}",
        "num_classes=2",
        "steps=1",
        "val_split=none",
        f"cache_dir={d / 'cache'}",
        "encoder=frozen",
        "embedding_cache=false",
        "batch_size=1",
        "arch=vit_tiny",
        "image_size=256",
    )
    return out


def test_changing_the_base_weights_makes_a_downstream_stage_rerun(finetuned, tmp_path):
    """The base weights are not in the record's own artifact list of older runs, but the registry names them:
    an evaluate recorded against this folder is up to date until they change."""
    from samadapt.evaluate.config import EvaluateConfig
    from samadapt.stage_record import STAGE_OUTPUT, describe_input, stage_status

    base = finetuned / "base_sam.safetensors"
    assert base.is_file()
    config = EvaluateConfig(model=str(finetuned), data=str(finetuned.parent / "m.jsonl"), out=tmp_path / "eval")
    config.out.mkdir()
    (config.out / STAGE_OUTPUT).write_text(
        json.dumps(
            {
                "stage": "evaluate",
                "config": json.loads(json.dumps(config.__dict__, default=str)),
                "inputs": {"model": describe_input(finetuned)},
            }
        ),
        encoding="utf-8",
    )
    assert stage_status("evaluate", config) == "up to date"
    saved = base.read_bytes()
    try:
        base.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))  # one bit of one weight
        assert stage_status("evaluate", config) == "run"
    finally:
        base.write_bytes(saved)
    assert stage_status("evaluate", config) == "up to date"


def test_a_folder_recorded_before_a_key_existed_still_evaluates(finetuned, tmp_path):
    record_path = finetuned / "stage_output.json"
    original = record_path.read_text(encoding="utf-8")
    record = json.loads(original)
    for dropped in ("mr_foreground", "resample_labels"):  # keys a later version added
        del record["config"][dropped]
    del record["config"]["lora"]["dropout"]
    try:
        record_path.write_text(json.dumps(record), encoding="utf-8")
        data = finetuned.parent / "m.jsonl"
        result = run_cli("evaluate", f"model={finetuned}", f"data={data}", f"out={tmp_path / 'eval'}", "overlays=false")
        assert "foreground mean Dice" in result.stdout
        record["config"]["num_classes"] = "two"
        record_path.write_text(json.dumps(record), encoding="utf-8")
        bad = run_cli("evaluate", f"model={finetuned}", f"data={data}", f"out={tmp_path / 'eval2'}", expect=None)
        assert_one_line_error(bad, "stage_output.json", "recorded config", "num_classes")
    finally:
        record_path.write_text(original, encoding="utf-8")
