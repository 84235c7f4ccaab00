"""Fine-tuned model I/O: save and load what a ``finetune`` folder holds, merge LoRA into plain SAM weights.

A finetune folder holds ``adapter/`` (peft ``save_pretrained``, LoRA only), ``trainable.safetensors`` (every other
trained tensor under its plain key) and, for ``checkpoint=none``, ``base_sam.safetensors`` (the random initial
SAM, part of the model); the file names come from the stage registry. :func:`load_finetune_output` rebuilds the
model from the folder's recorded config through the config builder (:class:`~samadapt.keys.SegmenterKeys`), so a
folder written before a key existed still loads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam
from torch import nn

from samadapt.config import from_record
from samadapt.data.preprocessing import Preprocessing
from samadapt.errors import UserError
from samadapt.io import atomic_path, ensure_writable_dir, give_usual_mode, sha256_file, temporary_name
from samadapt.keys import SegmenterKeys, StrategyKeys
from samadapt.models.checkpoints import load_sam
from samadapt.models.pretrained import PRETRAINED, pretrained_path
from samadapt.models.segmenter import SamSegmenter
from samadapt.models.strategies import apply_strategy, is_lora_param, plain_key, trained_tensors
from samadapt.stage_record import STAGE_OUTPUT, read_stage_output
from samadapt.stages import STAGES

FINETUNE = STAGES["finetune"]  # where a finetune folder keeps what (the registry spells the names)
ADAPTER_DIR = FINETUNE.artifacts["adapter"]
TRAINABLE_FILE = FINETUNE.artifacts["trainable"]


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing an older ``dest`` (renames only)."""
    old = None
    if dest.exists():
        old = temporary_name(dest)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old)


def save_finetuned(model: nn.Module, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``out_dir/adapter/`` (peft ``save_pretrained``; only with LoRA) and ``out_dir/trainable.safetensors``.

    Both are written under temporary names and renamed into place. Returns the written paths by name.
    """
    out_dir = ensure_writable_dir(out_dir)
    written: dict[str, Path] = {}
    if isinstance(model.sam, PeftModel):
        tmp = temporary_name(out_dir / ADAPTER_DIR)
        tmp.mkdir()
        try:
            model.sam.save_pretrained(tmp)
            give_usual_mode(tmp)
            _replace_dir(tmp, out_dir / ADAPTER_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written["adapter"] = out_dir / ADAPTER_DIR
    else:  # an adapter folder of an earlier run in this folder would be read as part of this model
        shutil.rmtree(out_dir / ADAPTER_DIR, ignore_errors=True)
    with atomic_path(out_dir / TRAINABLE_FILE) as tmp_file:
        save_file(trained_tensors(model), str(tmp_file), metadata={"format": "samadapt-trainable"})
    written["trainable"] = out_dir / TRAINABLE_FILE
    return written


def load_finetuned(base_model: nn.Module, out_dir: str | os.PathLike, strategy: StrategyKeys) -> nn.Module:
    """Apply ``strategy`` to a freshly built ``base_model`` (same base weights as in training) and load
    ``out_dir/adapter/`` and ``out_dir/trainable.safetensors`` into it. Returns the model."""
    out_dir = Path(out_dir)
    model = apply_strategy(base_model, strategy.encoder, strategy.decoder, strategy.lora, strategy.adapter)
    if isinstance(model.sam, PeftModel):
        _load_lora(model.sam, out_dir / ADAPTER_DIR)
    path = out_dir / TRAINABLE_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing — is {out_dir} a finished finetune output?")
    tensors = load_file(str(path))
    params = {plain_key(name): param for name, param in model.named_parameters() if not is_lora_param(name)}
    expected = set(trained_tensors(model))
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise UserError(
            f"{path}: tensors do not fit encoder={strategy.encoder} decoder={strategy.decoder} "
            f"(unexpected {extra[:3]}, missing {missing[:3]}) — use the strategy of the training run"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, model {tuple(params[name].shape)}"
                                " — same arch/image_size/num_classes as the training run?")
            params[name].copy_(tensor)
    return model


def _load_lora(peft_sam: PeftModel, adapter_dir: Path) -> None:
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        raise UserError(
            f"{adapter_dir}: no peft adapter_config.json + adapter_model.safetensors — trained without LoRA?"
        )
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    config = peft_sam.peft_config["default"]
    for field in ("r", "lora_alpha", "target_modules"):
        if saved.get(field) != getattr(config, field):
            raise UserError(
                f"{config_path}: {field}={saved.get(field)!r} but the strategy gives {getattr(config, field)!r} "
                "— use the lora.* keys of the training run"
            )
    weights = load_file(str(weights_path))
    expected = set(get_peft_model_state_dict(peft_sam))
    if set(weights) != expected:
        raise UserError(f"{weights_path}: LoRA tensors do not match the strategy's layers — wrong arch or lora.*?")
    set_peft_model_state_dict(peft_sam, weights)


def merge_into_sam(model: nn.Module) -> Sam:
    """A plain ``Sam`` (official keys and shapes) with LoRA merged into its weights and full parts included.

    ``model`` is left unchanged. Refused when trained modules outside ``sam.`` exist (bottleneck adapters,
    class heads/tokens): plain SAM weights cannot hold them.
    """
    extra = sorted({name.split(".")[0] for name, _ in model.named_parameters() if not name.startswith("sam.")})
    if extra:
        raise UserError(
            f"export_merged: the model has modules a plain SAM checkpoint cannot hold ({', '.join(extra)}) — "
            f"set export_merged=false and load {ADAPTER_DIR}/ + {TRAINABLE_FILE} instead"
        )
    sam = copy.deepcopy(model.sam)
    return sam.merge_and_unload() if isinstance(sam, PeftModel) else sam


def base_checkpoint(model_dir: Path, record: dict[str, Any]) -> Path | None:
    """The SAM weights the run started from, checked against the hash recorded at training time (a named
    pretrained checkpoint: against its pinned one)."""
    own = FINETUNE.path(model_dir, "base_weights")
    if own.is_file():
        return own
    named = (record.get("config") or {}).get("checkpoint")
    if named in PRETRAINED:  # found by name (the package may live elsewhere now), sha256-checked on the way
        return pretrained_path(named)
    entry = (record.get("inputs") or {}).get("checkpoint")
    if entry is None:
        return None
    path = Path(entry["path"])
    if not path.is_file():
        raise UserError(f"{model_dir}: its base checkpoint {path} is gone — restore it to use this model")
    if sha256_file(path) != entry["sha256"]:
        raise UserError(f"{model_dir}: its base checkpoint {path} changed since training (sha256 differs)")
    return path


@dataclass
class FinetunedModel:
    """A finetune folder's model (eval mode, CPU) with what it was trained as and the folder's record."""

    model: SamSegmenter
    keys: SegmenterKeys
    prep: Preprocessing
    record: dict[str, Any]


def load_finetune_output(model_dir: str | Path) -> FinetunedModel:
    """The trained model of a finetune folder, rebuilt from its ``stage_output.json``."""
    model_dir = Path(model_dir)
    record = read_stage_output(model_dir)
    if record.get("stage") != "finetune":
        raise UserError(
            f"{model_dir}: a {record.get('stage')} output, not a finetune output — "
            "pass a finetune folder or a SAM checkpoint as model="
        )
    source = model_dir / STAGE_OUTPUT
    keys = from_record(SegmenterKeys, record.get("config"), source)
    prep = from_record(Preprocessing, record.get("config"), source)
    sam = load_sam(keys.arch, base_checkpoint(model_dir, record), image_size=keys.image_size)
    model = load_finetuned(SamSegmenter(sam, keys.num_classes, keys.prompt), model_dir, keys)
    return FinetunedModel(model.eval(), keys, prep, record)
