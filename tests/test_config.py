"""The config system: YAML + dotted overrides, types, unknown keys, help table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from samadapt.config import describe, group, key, parse_config, required, to_dict
from samadapt.errors import UserError


@dataclass(kw_only=True)
class Lora:
    rank: int = key(8, "LoRA rank")
    alpha: float = key(16.0, "LoRA alpha")


@dataclass(kw_only=True)
class Example:
    data: str = required("manifest")
    out: Path = key(Path("runs/x"), "output folder")
    arch: Literal["vit_b", "vit_tiny"] = key("vit_b", "backbone")
    checkpoint: str | None = key(None, "weights")
    spacing: float | None = key(None, "mm")
    flip: bool = key(True, "flip augmentation")
    lora: Lora = group(Lora, "LoRA keys")

    def __post_init__(self):
        if self.lora.rank < 1:
            raise ValueError(f"lora.rank={self.lora.rank}: must be at least 1")


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = parse_config(Example, None, ["data=m.jsonl", "lora.rank=4", "spacing=1.5", "flip=false",
                                       "checkpoint=none", "out=~/o"])
    assert cfg.lora.rank == 4 and isinstance(cfg.lora.rank, int)
    assert cfg.spacing == 1.5 and cfg.flip is False and cfg.checkpoint is None
    assert cfg.out == Path("~/o").expanduser()
    assert to_dict(cfg)["lora"] == {"rank": 4, "alpha": 16.0}


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: a.jsonl\narch: vit_tiny\nlora:\n  rank: 2\n  alpha: 4\n", encoding="utf-8")
    cfg = parse_config(Example, path, ["lora.rank=3"])
    assert (cfg.data, cfg.arch, cfg.lora.rank, cfg.lora.alpha) == ("a.jsonl", "vit_tiny", 3, 4.0)


def test_yaml_booleans_read_back_as_the_words_of_a_choice(tmp_path):
    from samadapt.keys import TrainKeys

    @dataclass(kw_only=True)
    class Precision(TrainKeys):
        data: str = required("manifest")

    path = tmp_path / "c.yaml"
    path.write_text("data: a.jsonl\nmixed_precision: no\n", encoding="utf-8")  # YAML 1.1: `no` is False
    assert parse_config(Precision, path, []).mixed_precision == "no"
    path.write_text("data: a.jsonl\nmixed_precision: off\n", encoding="utf-8")
    assert parse_config(Precision, path, []).mixed_precision == "no"
    path.write_text("data: a.jsonl\narch: no\n", encoding="utf-8")
    with pytest.raises(UserError, match="arch=False: must be one of"):
        parse_config(Example, path, [])


@pytest.mark.parametrize("overrides, message", [
    (["data=a", "lora.rnak=2"], "unknown key 'lora.rnak' — did you mean lora.rank=?"),
    (["data=a", "lora.rank=two"], "lora.rank='two': expected an integer"),
    (["data=a", "lora.rank=2.5"], "lora.rank='2.5': expected an integer"),
    (["data=a", "arch=vit_q"], "arch='vit_q': must be one of vit_b, vit_tiny"),
    (["data=a", "flip=maybe"], "flip='maybe': expected true or false"),
    (["arch=vit_b"], "missing required key data="),
    (["data=a", "lora.rank=0"], "lora.rank=0: must be at least 1"),
    (["data"], "'data': expected key=value"),
])
def test_bad_keys_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError) as info:
        parse_config(Example, None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML at line"):
        parse_config(Example, path, [])
    with pytest.raises(UserError, match="missing.yaml: config file not found"):
        parse_config(Example, tmp_path / "missing.yaml", [])


def test_describe_lists_every_key_with_default():
    text = describe(Example)
    for line in ("data=REQUIRED", "arch=vit_b", "checkpoint=none", "flip=true", "lora.rank=8", "lora.alpha=16.0"):
        assert line in text


@pytest.mark.parametrize("overrides, message", [
    (["export_merged=true"], "export_merged=true needs prompt=box|point"),
    (["export_merged=true", "prompt=box", "encoder=adapter"], "no adapters"),
    (["num_classes=3", "class_weights=1,x,2"], "expected numbers"),
    (["class_weights=1,2"], "needs prompt=none and num_classes > 2"),
])
def test_finetune_keys_that_would_fail_after_training_fail_before_it(overrides, message):
    from samadapt.finetune.config import FinetuneConfig

    with pytest.raises(UserError, match=message):
        parse_config(FinetuneConfig, None, ["data=m.jsonl", "out=o", "num_classes=2", *overrides])


@pytest.mark.parametrize("command, overrides, says", [
    ("finetune", ["lr=nan"], "lr=nan: must be a finite number"),
    ("finetune", ["lr=inf"], "lr=inf: must be a finite number"),
    ("finetune", ["max_grad_norm=nan"], "max_grad_norm=nan: must be a finite number"),
    ("finetune", ["spacing=nan"], "spacing=nan: must be a finite number"),
    ("finetune", ["spacing=0.0005"], "spacing=0.0005: must be in [0.05, 50]"),
    ("finetune", ["num_workers=-1"], "num_workers=-1: must be in [0, 64]"),
    ("finetune", ["eval_batch_size=0"], "eval_batch_size=0: must be in [1, inf)"),
    ("finetune", ["augment.rotate=nan"], "augment.rotate=nan: must be a finite number"),
    ("finetune", ["window=nan,40"], "window='nan,40': width and level must be finite"),
    ("finetune", ["plane=all"], "plane=all is for pretraining"),
    ("evaluate", ["nsd_tolerances_mm=nan"], "nsd_tolerances_mm=nan: must be a finite number"),
    ("evaluate", ["batch_size=0"], "batch_size=0: must be in [1, inf)"),
    ("pretrain", ["mask_ratio=1"], "mask_ratio=1.0: must be in (0, 1)"),
])
def test_numeric_keys_are_finite_and_in_their_declared_range(tmp_path, command, overrides, says):
    """Through the CLI: refused before any work starts (nothing is created under out=)."""
    from conftest import assert_one_line_error, run_cli

    required = {"finetune": ["data=m.jsonl", "num_classes=2"], "evaluate": ["data=m.jsonl", "model=m"],
                "pretrain": ["data=m.jsonl"]}[command]
    result = run_cli(command, *required, f"out={tmp_path / 'out'}", *overrides, expect=None, in_process=True)
    assert_one_line_error(result, says)
    assert not (tmp_path / "out").exists()


def test_help_shows_each_range():
    from samadapt.finetune.config import FinetuneConfig

    text = describe(FinetuneConfig)
    assert "(range (0, 10])" in text and "(range [0.05, 50])" in text and "(range [0, 1])" in text
