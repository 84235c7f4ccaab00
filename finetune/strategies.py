"""The study's fine-tuning strategies: ``encoder`` x ``decoder`` in {frozen, full, lora, adapter}.

The model is any module with the SAM model at ``.sam`` (e.g. the segmenter); modules outside ``sam.``
(class heads, class tokens, bottleneck adapters) are new and always trained. The prompt encoder is
frozen under every strategy: with ``prompt=none`` it only contributes its learned no-mask embedding,
and box/point prompts keep SAM's pretrained prompt geometry.

- ``frozen``: the part's weights do not change.
- ``full``: every parameter of ``sam.image_encoder`` / ``sam.mask_decoder`` is trained.
- ``lora``: peft LoRA on the part's Linear layers chosen by ``lora.targets`` (encoder: in the blocks
  chosen by ``lora.blocks``). ``.sam`` is wrapped by ``peft.get_peft_model`` (one ``LoraConfig`` for
  both parts), so ``out/adapter/`` loads with ``PeftModel.from_pretrained`` onto a plain SAM.
- ``adapter``: bottleneck adapters after every block (see :mod:`samadapt.finetune.adapters`).

Saved weights: ``out/adapter/`` (peft format, LoRA only) and ``out/trainable.safetensors`` (every other
trained tensor under its plain model key, e.g. ``sam.mask_decoder.…``, ``class_head.…``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam
from torch import nn

from samadapt.errors import UserError
from samadapt.finetune.config import STRATEGIES, AdapterKeys, LoraKeys, StrategyKeys, target_tokens
from samadapt.finetune.adapters import ADAPTERS_ATTR, add_bottleneck_adapters, encoder_blocks
from samadapt.runs import atomic_path, ensure_writable_dir, temporary_name

ADAPTER_DIR = "adapter"
TRAINABLE_FILE = "trainable.safetensors"

# Shorthand targets → regex fullmatched against the end of a Linear's name (after a dot).
# Encoder names are relative to a block (ViT: attn.qkv, mlp.lin1; TinyViT: attn.qkv, mlp.fc1);
# decoder names are relative to sam.mask_decoder (transformer.layers.0.self_attn.q_proj, ...).
ENCODER_TARGETS = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "mlp": r"mlp\.(lin1|lin2|fc1|fc2)"}
DECODER_TARGETS = {"qkv": r"[qkv]_proj", "proj": r"out_proj", "mlp": r"mlp\.lin[12]"}
def _shortened(names: list[str]) -> str:
    """``layers.0.mlp.lin1, layers.1.mlp.lin1`` → ``layers.*.mlp.lin1`` (order kept, duplicates dropped)."""
    return ", ".join(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", n) for n in names))


def _match_targets(linears: list[str], tokens: list[str], shorthands: dict[str, str], part: str) -> list[str]:
    """The names in ``linears`` (relative names) hit by any token; a token hitting none is a UserError."""
    hit: set[str] = set()
    for token in tokens:
        pattern = re.compile(rf"(?:.*\.)?(?:{shorthands.get(token, token)})")
        matched = {name for name in linears if pattern.fullmatch(name)}
        if not matched:
            raise UserError(
                f"lora.targets: {token!r} matches no Linear layer of the {part} — available: {_shortened(linears)}"
            )
        hit |= matched
    return [name for name in linears if name in hit]


def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]


def _alternation(names: list[str], any_index: bool) -> str:
    r"""A regex for exactly ``names``, grouped by parent: ``(?:a\.self_attn\.(?:q_proj|k_proj)|...)``.

    With ``any_index`` numeric path parts become ``\d+`` (for "every block/layer")."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        escaped = re.escape(parent)
        if any_index:
            escaped = re.sub(r"(?<=\\\.)\d+(?=\\\.|$)|^\d+(?=\\\.)", r"\\d+", escaped)
        leaves = by_parent.setdefault(escaped + r"\." if parent else "", [])
        if re.escape(leaf) not in leaves:
            leaves.append(re.escape(leaf))
    groups = [p + (ls[0] if len(ls) == 1 else "(?:" + "|".join(ls) + ")") for p, ls in by_parent.items()]
    return "(?:" + "|".join(groups) + ")"


def lora_target_regex(sam: nn.Module, encoder: bool, decoder: bool, lora: LoraKeys) -> str:
    """The peft ``target_modules`` regex (peft fullmatches it, so it is anchored at both ends).

    Built from the Linear layers that really exist, so e.g. ``proj`` never hits the patch embedding's
    ``patch_embed.proj`` (a Conv2d outside every block). Checked to match exactly the intended layers.
    """
    tokens = target_tokens(lora.targets)
    linear_names = _linear_names(sam)
    alternatives, expected = [], set()
    if encoder:
        blocks = encoder_blocks(sam)
        chosen = [blocks[i][0] for i in lora.block_indices(len(blocks))]
        # TinyViT stages differ in width, not in layer names: the relative names are the same in every block.
        relative = _match_targets(_linear_names(blocks[0][1]), tokens, ENCODER_TARGETS, "image encoder blocks")
        alternatives.append(_alternation(chosen, any_index=False) + r"\." + _alternation(relative, any_index=False))
        expected |= {f"{b}.{r}" for b in chosen for r in relative}
    if decoder:
        relative = _match_targets(_linear_names(sam.mask_decoder), tokens, DECODER_TARGETS, "mask decoder")
        alternatives.append(r"mask_decoder\." + _alternation(relative, any_index=True))
        expected |= {f"mask_decoder.{r}" for r in relative}
    regex = "|".join(alternatives)
    matched = {name for name, _ in sam.named_modules() if re.fullmatch(regex, name)}
    if matched != expected & set(linear_names):  # a bug in the regex construction, not a user error
        raise AssertionError(f"LoRA regex {regex} matches {sorted(matched ^ expected)[:5]} unexpectedly")
    return regex


def apply_strategy(model: nn.Module, encoder: str, decoder: str, lora: LoraKeys, adapter: AdapterKeys) -> nn.Module:
    """Set up ``model`` (with the SAM model at ``model.sam``) for training under a strategy, in place.

    Everything under ``sam.`` is frozen, then per part: ``full`` unfreezes it, ``lora`` wraps ``model.sam``
    with peft (only lora_A/lora_B train), ``adapter`` adds trainable bottleneck adapters as
    ``model.bottleneck_adapters``. The prompt encoder stays frozen. Parameters outside ``sam.`` stay trainable.
    Returns ``model``.
    """
    for part, value in (("encoder", encoder), ("decoder", decoder)):
        if value not in STRATEGIES:
            raise UserError(f"{part}={value!r}: must be one of {', '.join(STRATEGIES)}")
    sam = model.sam
    if isinstance(sam, PeftModel) or hasattr(model, ADAPTERS_ATTR):
        raise ValueError("apply_strategy: the model already has a strategy applied — build a fresh model")
    if "adapter" in (encoder, decoder):
        add_bottleneck_adapters(
            model, sam, encoder == "adapter", decoder == "adapter", adapter.bottleneck, adapter.scale
        )
    for param in model.parameters():
        param.requires_grad_(True)
    sam.requires_grad_(False)
    if "lora" in (encoder, decoder):
        config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
            target_modules=lora_target_regex(sam, encoder == "lora", decoder == "lora", lora),
        )
        model.sam = get_peft_model(sam, config)  # trains only lora_A/lora_B inside sam
    if encoder == "full":
        sam.image_encoder.requires_grad_(True)
    if decoder == "full":
        sam.mask_decoder.requires_grad_(True)
    return model


def plain_key(name: str) -> str:
    """A name without peft's wrapper prefix: ``sam.base_model.model.x`` → ``sam.x`` (LoRA-wrapped layers keep
    their ``.base_layer``; they are never trained, so never saved)."""
    prefix = "sam.base_model.model."
    return "sam." + name[len(prefix):] if name.startswith(prefix) else name


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def parameter_summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts, overall and per part (``sam.image_encoder``, ``class_head``, ...).

    LoRA and adapter parameters count toward the part they sit in (adapters: ``bottleneck_adapters``)."""
    by_part: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        parts = plain_key(name).split(".")
        part = ".".join(parts[:2]) if parts[0] == "sam" else parts[0]
        counts = by_part.setdefault(part, {"trainable": 0, "total": 0})
        counts["total"] += param.numel()
        counts["trainable"] += param.numel() if param.requires_grad else 0
    return {
        "trainable": sum(c["trainable"] for c in by_part.values()),
        "total": sum(c["total"] for c in by_part.values()),
        "by_part": by_part,
    }


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def parameter_summary_line(summary: dict) -> str:
    """``trainable 1.2M / 93.7M (1.3%)`` for :func:`parameter_summary`'s result."""
    percent = 100 * summary["trainable"] / max(summary["total"], 1)
    shown = f"{percent:.1f}" if percent >= 0.1 or percent == 0 else f"{percent:.2g}"
    return f"trainable {_count(summary['trainable'])} / {_count(summary['total'])} ({shown}%)"


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable non-LoRA parameter under its plain key (full parts, adapters, new heads)."""
    return {
        plain_key(name): param.detach().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad and not is_lora_param(name)
    }


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
            _replace_dir(tmp, out_dir / ADAPTER_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written["adapter"] = out_dir / ADAPTER_DIR
    else:  # an adapter folder of an earlier run in this folder would be read as part of this model
        shutil.rmtree(out_dir / ADAPTER_DIR, ignore_errors=True)
    with atomic_path(out_dir / TRAINABLE_FILE) as tmp_file:
        save_file(_trained_tensors(model), str(tmp_file), metadata={"format": "samadapt-trainable"})
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
    expected = set(_trained_tensors(model))
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
        raise UserError(f"{adapter_dir}: no peft adapter_config.json + adapter_model.safetensors — trained without LoRA?")
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
