"""``samadapt run`` through the real CLI: a tiny pretrain → finetune → evaluate pipeline on real MRI that skips
what is up to date, reruns exactly what a change touches, and resumes a stage killed mid-training."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import assert_one_line_error, kill_when, run_cli


def write_pipeline(folder: Path, manifests, checkpoint, **stage_overrides) -> Path:
    spec = {
        "name": "tiny",
        "defaults": {"arch": "vit_tiny", "image_size": 256, "seed": 0, "batch_size": 4},
        "stages": {
            "pretrain": {"command": "pretrain", "config": {
                "data": str(manifests["ssl"]), "checkpoint": str(checkpoint), "steps": 4, "save_every": 2,
                "warmup_steps": 0, "variant": "mask_token", "preview_every": 0}},
            "finetune": {"command": "finetune", "config": {
                "data": str(manifests["brain"]), "checkpoint": "${pretrain.sam_checkpoint}", "num_classes": 2,
                "steps": 12, "save_every": 3, "val_every": 12, "lr": 1e-3, "warmup_steps": 0}},
            "evaluate": {"command": "evaluate", "config": {
                "model": "${finetune.dir}", "data": str(manifests["brain"]), "split": "test", "overlays": False}},
        },
        "compare": ["evaluate"],
    }
    for stage, config in stage_overrides.items():
        spec["stages"][stage]["config"].update(config)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def statuses(stdout: str) -> dict[str, str]:
    """{stage: 'skipped' | 'running' | 'resuming'} from the runner's progress lines."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("[") and "]" in line:
            stage, rest = line[1:].split("]", 1)
            for word in ("up to date", "running", "resuming"):
                if rest.strip().startswith(word):
                    found[stage] = word
    return found


@pytest.fixture(scope="module")
def pipeline_run(small_manifests, tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    path = write_pipeline(folder, small_manifests, tiny_checkpoint)
    runs = folder / "runs"
    first = run_cli("run", path, "--runs-dir", runs)
    return path, runs, first


def test_first_run_runs_every_stage_and_writes_the_bundle(pipeline_run):
    _, runs, first = pipeline_run
    assert statuses(first.stdout) == {"pretrain": "running", "finetune": "running", "evaluate": "running"}
    bundle = json.loads((runs / "pipeline.json").read_text(encoding="utf-8"))
    assert bundle["stages"]["finetune"]["checkpoint"] == str(runs / "pretrain" / "sam_checkpoint.pth")
    assert (runs / "compare.md").is_file() and "evaluate" in (runs / "compare.md").read_text(encoding="utf-8")


def test_rerun_skips_what_is_up_to_date_and_reruns_what_changed(pipeline_run):
    path, runs, _ = pipeline_run
    again = run_cli("run", path, "--runs-dir", runs)
    assert statuses(again.stdout) == {"pretrain": "up to date", "finetune": "up to date", "evaluate": "up to date"}

    evaluated_before = (runs / "evaluate" / "stage_output.json").read_text(encoding="utf-8")
    (runs / "evaluate" / "stage_output.json").unlink()  # as if evaluate had crashed
    only_evaluate = run_cli("run", path, "--runs-dir", runs)
    assert statuses(only_evaluate.stdout) == {"pretrain": "up to date", "finetune": "up to date",
                                              "evaluate": "running"}
    assert json.loads(evaluated_before)["metrics"]["foreground_mean"] == json.loads(
        (runs / "evaluate" / "stage_output.json").read_text(encoding="utf-8"))["metrics"]["foreground_mean"]

    # a dry run already knows that evaluate follows a finetune that will rerun
    planned = run_cli("run", path, "--runs-dir", runs, "finetune.lr=2e-3", "--dry-run")
    assert [line.split()[2] for line in planned.stdout.splitlines()] == ["up", "run", "run"]
    changed = run_cli("run", path, "--runs-dir", runs, "finetune.lr=2e-3")
    assert statuses(changed.stdout) == {"pretrain": "up to date", "finetune": "running", "evaluate": "running"}
    assert json.loads((runs / "finetune" / "stage_output.json").read_text(encoding="utf-8"))["config"]["lr"] == 2e-3


def test_killed_stage_resumes_and_downstream_reruns(small_manifests, tiny_checkpoint, tmp_path):
    path = write_pipeline(tmp_path, small_manifests, tiny_checkpoint)
    runs = tmp_path / "runs"
    kill_when(["run", path, "--runs-dir", runs], runs / "finetune" / "state" / "step_3" / "progress.json")
    assert not (runs / "finetune" / "stage_output.json").exists()

    dry = run_cli("run", path, "--runs-dir", runs, "--dry-run")
    assert [line.split()[:3] for line in dry.stdout.splitlines()] == [
        ["pretrain", "pretrain", "up"], ["finetune", "finetune", "resume"], ["evaluate", "evaluate", "run"]]
    resumed = run_cli("run", path, "--runs-dir", runs)
    assert statuses(resumed.stdout) == {"pretrain": "up to date", "finetune": "resuming", "evaluate": "running"}
    metrics = json.loads((runs / "finetune" / "stage_output.json").read_text(encoding="utf-8"))["metrics"]
    assert metrics["resumed_from_step"] >= 3 and metrics["steps"] == 12


def test_from_and_until_select_stages(pipeline_run):
    path, runs, _ = pipeline_run
    until = run_cli("run", path, "--runs-dir", runs, "--until", "pretrain", "--force")
    assert statuses(until.stdout) == {"pretrain": "running"}
    # forced means from scratch: the training states of the finished run are not resumed
    record = json.loads((runs / "pretrain" / "stage_output.json").read_text(encoding="utf-8"))
    assert record["metrics"]["resumed_from_step"] is None and record["metrics"]["steps"] == 4
    # pretrain was rerun (its checkpoint is rewritten, so its hash may change): finetune depends on it
    started = run_cli("run", path, "--runs-dir", runs, "--from", "evaluate", "--dry-run")
    assert [line.split()[0] for line in started.stdout.splitlines()] == ["evaluate"]


def test_pipeline_spec_errors_are_one_line(tmp_path, small_manifests, tiny_checkpoint):
    cyclic = write_pipeline(tmp_path, small_manifests, tiny_checkpoint,
                            pretrain={"checkpoint": "${finetune.sam_merged}"})
    assert_one_line_error(run_cli("run", cyclic, "--dry-run", expect=None, in_process=True), "cycle")
    unknown = write_pipeline(tmp_path, small_manifests, tiny_checkpoint, finetune={"checkpoint": "${pretrian.dir}"})
    assert_one_line_error(run_cli("run", unknown, "--dry-run", expect=None, in_process=True), "pretrian")
    good = write_pipeline(tmp_path, small_manifests, tiny_checkpoint)
    assert_one_line_error(run_cli("run", good, "--dry-run", "finetune.lrr=1", expect=None, in_process=True), "lrr")
    assert_one_line_error(run_cli("run", tmp_path / "missing.yaml", expect=None, in_process=True), "missing.yaml")


def test_strategy_grid_expands_its_matrix(tmp_path):
    result = run_cli("run", "strategy_grid", "--dry-run", "--runs-dir", tmp_path)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    spec = yaml.safe_load((Path(__file__).parents[1] / "pipelines" / "strategy_grid.yaml").read_text(encoding="utf-8"))
    archs = [a["name"] for a in spec["matrix"]["arch"]]
    assert len(archs) == 3 and len(spec["matrix"]["strategy"]) == 6  # the study's 3 x {decoder, enc+dec} x 3
    cells = [f"{arch}-{strategy['name']}" for arch in archs for strategy in spec["matrix"]["strategy"]]
    assert [n for n in names if n.startswith("finetune/")] == [f"finetune/{c}" for c in cells]
    assert [n for n in names if n.startswith("evaluate/")] == [f"evaluate/{c}" for c in cells]


def test_a_manifest_input_hash_covers_the_volumes_it_lists(tmp_path):
    from samadapt.stage_record import describe_input

    image = np.zeros((6, 5, 4), dtype=np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "img.nii.gz")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": "img.nii.gz", "label": "", "modality": "MR"}) + "\n",
                        encoding="utf-8")
    before = describe_input(manifest)
    assert list(before["files"]) == [str(tmp_path / "img.nii.gz")]
    image[2, 2, 2] = 1.0  # the same manifest text, an image edited in place
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "img.nii.gz")
    assert describe_input(manifest)["sha256"] != before["sha256"]


def test_matrix_mappings_without_names_and_bad_matrix_refs(tmp_path):
    spec = {"name": "m", "matrix": {"strategy": [{"encoder": "lora", "decoder": "full"},
                                                 {"encoder": "frozen", "decoder": "full"}]},
            "stages": {"finetune": {"command": "finetune", "config": {
                "data": "x.jsonl", "num_classes": 2, "encoder": "${matrix.strategy.encoder}"}}}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    listed = run_cli("run", path, "--dry-run", "--runs-dir", tmp_path / "runs")
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["finetune/lora_full", "finetune/frozen_full"]
    for ref in ("${matrix.strategy}", "${matrix.strategy.rank}", "${matrix.arch}"):
        spec["stages"]["finetune"]["config"]["encoder"] = ref
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        assert_one_line_error(run_cli("run", path, "--dry-run", expect=None, in_process=True), ref)
