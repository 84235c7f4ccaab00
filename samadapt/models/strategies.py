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
- ``adapter``: bottleneck adapters after every block (see :mod:`samadapt.models.adapters`).

Saved weights: ``out/adapter/`` (peft format, LoRA only) and ``out/trainable.safetensors`` (every other
trained tensor under its plain model key, e.g. ``sam.mask_decoder.…``, ``class_head.…``).
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from samadapt.errors import UserError
from samadapt.keys import STRATEGIES, AdapterKeys, LoraKeys, target_tokens
from samadapt.models.adapters import ADAPTERS_ATTR, add_bottleneck_adapters, encoder_blocks

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


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable non-LoRA parameter under its plain key (full parts, adapters, new heads)."""
    return {
        plain_key(name): param.detach().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad and not is_lora_param(name)
    }
