"""The CLI contract: help for every command, config errors and bad checkpoints as one-line errors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from samadapt.models import build_sam, save_sam_checkpoint

COMMANDS = ["pretrain", "finetune", "baseline", "evaluate", "predict", "run", "data", "checkpoint", "compare"]


def test_top_level_help_lists_every_command():
    out = run_cli("--help").stdout
    for command in COMMANDS:
        assert f"    {command}" in out


@pytest.mark.parametrize("command, must_show", [
    ("pretrain", ["data=REQUIRED", "mask_ratio=0.75", "variant=", "arch=vit_b", "save_every="]),
    ("finetune", ["num_classes=REQUIRED", "encoder=lora", "decoder=full", "lora.rank=8", "prompt=none",
                  "augment.flip=true", "export_merged=false"]),
    ("evaluate", ["data=REQUIRED", "model=none", "predictions=none", "nsd_tolerances_mm=1,2", "split=test"]),
    ("predict", ["input=REQUIRED", "save_probabilities=false"]),
    ("run", ["--from", "--until", "--force", "--dry-run"]),
    ("data", ["import", "demo", "check"]),
    ("checkpoint", ["info", "convert"]),
    ("compare", ["EVAL_DIR"]),
])
def test_each_command_help(command, must_show):
    out = run_cli(command, "--help").stdout
    for text in must_show:
        assert text in out, f"{command} --help lacks {text!r}"


def test_unknown_key_and_wrong_type_are_one_line_errors(tmp_path):
    result = run_cli("finetune", "data=x.jsonl", f"out={tmp_path}", "num_classes=2", "lora.rnak=4", expect=None,
                     in_process=True)
    assert_one_line_error(result, "unknown key 'lora.rnak'", "did you mean lora.rank=")
    result = run_cli("finetune", "data=x.jsonl", f"out={tmp_path}", "num_classes=two", expect=None, in_process=True)
    assert_one_line_error(result, "num_classes='two': expected an integer")
    result = run_cli("pretrain", "data=x.jsonl", f"out={tmp_path}", "mask_ratio=1.5", expect=None, in_process=True)
    assert_one_line_error(result, "mask_ratio=1.5", "must be in (0, 1)")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A real vit_tiny checkpoint in the official layout, a truncated copy and a malicious pickle."""
    folder = tmp_path_factory.mktemp("ckpt")
    good = save_sam_checkpoint(build_sam("vit_tiny"), "vit_tiny", folder / "tiny.pth")
    data = good.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'PWNED'}",))

    with open(folder / "evil.pth", "wb") as handle:
        pickle.dump({"image_encoder.pos_embed": Exploit()}, handle)
    return folder


@pytest.mark.parametrize("name, fragments", [
    ("missing.pth", ["missing.pth", "not found"]),
    ("truncated.pth", ["truncated.pth"]),
    ("evil.pth", ["evil.pth", "refusing to execute code from an untrusted pickle"]),
])
def test_bad_checkpoints_via_checkpoint_info(checkpoints, name, fragments):
    result = run_cli("checkpoint", "info", checkpoints / name, expect=None, in_process=True)
    assert_one_line_error(result, *fragments)
    assert not (checkpoints / "PWNED").exists()


def test_wrong_arch_checkpoint_in_a_stage_names_the_detected_arch(checkpoints, tmp_path, small_manifests):
    result = run_cli("pretrain", f"data={small_manifests['ssl']}", f"out={tmp_path / 'out'}", "arch=vit_b",
                     f"checkpoint={checkpoints / 'tiny.pth'}", "image_size=256", "steps=1", expect=None)
    assert_one_line_error(result, "tiny.pth", "looks like vit_tiny", "arch=vit_b")
    assert not (tmp_path / "out" / "stage_output.json").exists()


def test_good_checkpoint_info_reports_arch(checkpoints):
    out = run_cli("checkpoint", "info", checkpoints / "tiny.pth").stdout
    assert "vit_tiny" in out and "256" in out
    assert torch.load(checkpoints / "tiny.pth", weights_only=True)["image_encoder.pos_embed"].shape[1] == 16


def test_debug_flag_keeps_the_traceback(checkpoints):
    result = run_cli("--debug", "checkpoint", "info", checkpoints / "missing.pth", expect=None)
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr
