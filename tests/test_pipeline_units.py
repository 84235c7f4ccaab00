"""The pipeline runner in-process: planning, ``${...}`` substitution and stage status on hand-written specs and
folders (no stage runs), and the one-line errors for hostile pipeline and config YAML through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, run_cli
from samadapt.errors import UserError
from samadapt.pipelines.runner import plan, resolve_config
from samadapt.stage_record import RUN_CONFIG, STAGE_OUTPUT, describe_input, stage_status

SPEC = {
    "name": "p",
    "defaults": {"arch": "vit_tiny", "image_size": 256, "steps": 3},
    "matrix": {"strategy": [{"name": "lora", "encoder": "lora"}, {"name": "frozen", "encoder": "frozen"}]},
    "stages": {
        "pretrain": {"command": "pretrain", "config": {"data": "ssl.jsonl"}},
        "finetune": {"command": "finetune", "config": {"data": "m.jsonl", "num_classes": 2,
                                                       "checkpoint": "${pretrain.sam_safetensors}",
                                                       "encoder": "${matrix.strategy.encoder}"}},
        "evaluate": {"command": "evaluate", "config": {"data": "m.jsonl", "model": "${finetune.dir}"}},
    },
}


def test_plan_orders_stages_and_expands_only_the_cells_that_use_the_matrix(tmp_path):
    stages = plan(SPEC, tmp_path / "p.yaml", tmp_path / "runs")
    assert [s.name for s in stages] == ["pretrain", "finetune/lora", "finetune/frozen", "evaluate/lora",
                                        "evaluate/frozen"]
    by_name = {s.name: s for s in stages}
    assert by_name["evaluate/frozen"].deps == ["finetune/frozen"]
    assert by_name["finetune/lora"].deps == ["pretrain"]
    assert by_name["evaluate/lora"].out == tmp_path / "runs" / "evaluate" / "lora"


def test_references_resolve_to_registry_paths_and_overrides_win_in_order(tmp_path):
    stages = plan(SPEC, tmp_path / "p.yaml", tmp_path / "runs")
    by_name = {s.name: s for s in stages}
    overrides = {"steps": "5", "finetune.steps": "7"}
    finetune = resolve_config(by_name["finetune/frozen"], by_name, SPEC["defaults"], overrides)
    assert finetune.checkpoint == str(tmp_path / "runs" / "pretrain" / "sam_checkpoint.safetensors")
    assert finetune.encoder == "frozen" and finetune.steps == 7 and finetune.arch == "vit_tiny"
    pretrain = resolve_config(by_name["pretrain"], by_name, SPEC["defaults"], overrides)
    assert pretrain.steps == 5 and pretrain.out == tmp_path / "runs" / "pretrain"
    evaluate = resolve_config(by_name["evaluate/lora"], by_name, SPEC["defaults"], overrides)
    assert evaluate.model == str(tmp_path / "runs" / "finetune" / "lora")
    bad = {**SPEC, "stages": {**SPEC["stages"], "evaluate": {"command": "evaluate", "config": {
        "data": "m.jsonl", "model": "${finetune.weights}"}}}}
    stages = plan(bad, tmp_path / "p.yaml", tmp_path / "runs")
    by_name = {s.name: s for s in stages}
    with pytest.raises(UserError, match="finetune stages provide dir, adapter, trainable"):
        resolve_config(by_name["evaluate/lora"], by_name, SPEC["defaults"], {})


def _record(out: Path, name: str, stage: str, config, inputs: dict) -> None:
    from samadapt.config import to_dict

    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps({"stage": stage, "config": to_dict(config), "inputs": inputs}),
                            encoding="utf-8")


def test_stage_status_on_hand_written_folders(tmp_path):
    from samadapt.finetune.config import FinetuneConfig

    (tmp_path / "img.nii.gz").write_bytes(b"not read, only hashed")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "image": "img.nii.gz", "modality": "MR", "split": "train"}\n', encoding="utf-8")
    config = FinetuneConfig(data=str(manifest), out=tmp_path / "ft", num_classes=2)
    assert stage_status("finetune", config) == "run"  # no folder yet
    inputs = {"data": {"path": str(manifest), "sha256": describe_input(manifest)["sha256"]}}
    _record(config.out, RUN_CONFIG, "finetune", config, inputs)
    assert stage_status("finetune", config) == "run"  # a run record but no saved state
    (config.out / "state" / "step_4").mkdir(parents=True)
    (config.out / "state" / "step_4" / "progress.json").write_text("{}", encoding="utf-8")
    assert stage_status("finetune", config) == "resume"
    _record(config.out, STAGE_OUTPUT, "finetune", config, inputs)
    assert stage_status("finetune", config) == "up to date"
    assert stage_status("evaluate", config) == "run"  # another stage's record never counts
    changed = FinetuneConfig(data=str(manifest), out=tmp_path / "ft", num_classes=2, steps=7)
    assert stage_status("finetune", changed) == "run"  # its states belong to the old config: not resumed
    (tmp_path / "img.nii.gz").write_bytes(b"edited in place")
    assert stage_status("finetune", config) == "run"  # a volume the manifest lists changed


@pytest.mark.parametrize("spec, says", [
    ({"stages": {"../up": {"command": "finetune", "config": {"data": "x.jsonl", "num_classes": 2}}}},
     "stage name '../up' is not a plain folder name"),
    ({"name": "../../etc", "stages": {"a": {"command": "finetune"}}}, "pipeline name '../../etc'"),
    ({"matrix": {"arch": ["../../x"]}, "stages": {"f": {"command": "finetune", "config": {
        "data": "x.jsonl", "num_classes": 2, "arch": "${matrix.arch}"}}}}, "matrix cell '../../x'"),
    ({"matrix": {"s": [{"name": "a", "encoder": "lora"}, {"name": "a", "encoder": "full"}]},
      "stages": {"f": {"command": "finetune", "config": {"data": "x.jsonl", "num_classes": 2,
                                                         "encoder": "${matrix.s.encoder}"}}}}, "are both named 'a'"),
    ({"stages": {"f": {"command": "finetune", "config": {"data": "x.jsonl", "num_classes": 2}}}, "compare": 5},
     "compare must be an evaluate stage's name"),
    ({"stages": {"f": {"command": "finetune", "config": {"data": "x.jsonl", "num_classes": 2}}}, "compare": ["f"]},
     "compare lists 'f', which is not an evaluate stage"),
])
def test_pipeline_specs_that_would_escape_or_fail_late_are_refused_first(tmp_path, spec, says):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert_one_line_error(run_cli("run", path, "--runs-dir", tmp_path / "runs", expect=None, in_process=True), says)
    assert not (tmp_path / "runs").exists()


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, says", [
    (BILLION_LAUGHS, "expands to more than 100000 values"),
    ("a: &a [*a]\n", "expands to more than 100000 values"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "p.yaml"),
    ("k: " + "x" * (1 << 20) + "\n", "a config is at most 1048576 bytes"),
])
def test_hostile_yaml_is_a_one_line_error_for_configs_and_pipelines(tmp_path, text, says):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    assert_one_line_error(run_cli("run", path, expect=None, in_process=True), says)
    assert_one_line_error(run_cli("finetune", "--config", path, "data=x", "out=o", "num_classes=2", expect=None,
                                  in_process=True), says)
    path.write_bytes("arch: vit_b\n".encode("utf-16"))
    assert_one_line_error(run_cli("run", path, expect=None, in_process=True), "not UTF-8")
