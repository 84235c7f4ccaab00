"""Rebuild a fine-tuned model from its ``finetune`` output folder, or a plain SAM for zero-shot use."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from samadapt.data import Preprocessing
from samadapt.errors import UserError
from samadapt.finetune.segmenter import SamSegmenter
from samadapt.finetune.strategies import AdapterKeys, LoraKeys, StrategyKeys, load_finetuned
from samadapt.models.checkpoints import load_sam
from samadapt.runs import read_stage_output, sha256_file

BASE_WEIGHTS = "base_sam.safetensors"  # the random initial SAM of a checkpoint=none run


def base_checkpoint(model_dir: Path, record: dict[str, Any]) -> Path | None:
    """The SAM weights the run started from, checked against the hash recorded at training time."""
    own = model_dir / BASE_WEIGHTS
    if own.is_file():
        return own
    entry = record.get("inputs", {}).get("checkpoint")
    if entry is None:
        return None
    path = Path(entry["path"])
    if not path.is_file():
        raise UserError(f"{model_dir}: its base checkpoint {path} is gone — restore it to use this model")
    if sha256_file(path) != entry["sha256"]:
        raise UserError(f"{model_dir}: its base checkpoint {path} changed since training (sha256 differs)")
    return path


def preprocessing_of(config: dict[str, Any]) -> Preprocessing:
    """The exact slice preprocessing a stage ran with, from its recorded config."""
    return Preprocessing(**{f.name: config[f.name] for f in dataclasses.fields(Preprocessing)})


def load_finetune_output(model_dir: str | Path) -> tuple[SamSegmenter, dict[str, Any]]:
    """The trained model (eval mode, CPU) and the run's ``stage_output.json`` record."""
    model_dir = Path(model_dir)
    record = read_stage_output(model_dir)
    if record.get("stage") != "finetune":
        raise UserError(f"{model_dir}: a {record.get('stage')} output, not a finetune output — "
                        "pass a finetune folder or a SAM checkpoint as model=")
    config = record["config"]
    sam = load_sam(config["arch"], base_checkpoint(model_dir, record), image_size=config["image_size"])
    strategy = StrategyKeys(encoder=config["encoder"], decoder=config["decoder"], lora=LoraKeys(**config["lora"]),
                            adapter=AdapterKeys(**config["adapter"]))
    model = load_finetuned(SamSegmenter(sam, config["num_classes"], config["prompt"]), model_dir, strategy)
    return model.eval(), record
