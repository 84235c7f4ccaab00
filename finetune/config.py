"""Keys of ``samadapt finetune`` (``samadapt finetune --help`` prints them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from samadapt.config import group, key, required
from samadapt.data.augment import AugmentConfig
from samadapt.errors import UserError
from samadapt.keys import DataKeys, ModelKeys, TrainKeys

PromptMode = Literal["none", "box", "point"]
Strategy = Literal["frozen", "full", "lora", "adapter"]
STRATEGIES: tuple[str, ...] = ("frozen", "full", "lora", "adapter")
_BLOCKS_SYNTAX = re.compile(r"all|last\d+|\d+(,\d+)*")


@dataclass
class LoraKeys:
    rank: int = key(8, "LoRA rank r")
    alpha: float = key(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = key(0.0, "dropout on the LoRA input")
    targets: str = key(
        "qkv,proj",
        "comma list of Linear layers: qkv (attention q/k/v), proj (attention output), mlp; or a regex "
        "matched against the end of a layer name (e.g. mlp\\.lin1)",
    )
    blocks: str = key("all", "image-encoder blocks with LoRA: all, lastN (e.g. last4) or indices (0,1,5)")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        if not _BLOCKS_SYNTAX.fullmatch(self.blocks.replace(" ", "")):
            raise ValueError(f"lora.blocks={self.blocks!r}: use all, lastN (e.g. last4) or indices like 0,1,5")
        for token in target_tokens(self.targets):
            try:
                re.compile(token)
            except re.error as exc:
                raise ValueError(f"lora.targets: {token!r} is not a valid regex ({exc})") from None

    def block_indices(self, count: int) -> list[int]:
        """Indices of the chosen blocks among ``count`` encoder blocks."""
        spec = self.blocks.replace(" ", "")
        if spec == "all":
            return list(range(count))
        if spec.startswith("last"):
            last = int(spec[4:])
            if not 1 <= last <= count:
                raise UserError(f"lora.blocks={spec}: the image encoder has {count} blocks — use last1..last{count}")
            return list(range(count - last, count))
        indices = sorted({int(i) for i in spec.split(",")})
        if indices[-1] >= count:
            raise UserError(f"lora.blocks={spec}: the image encoder has {count} blocks (0–{count - 1})")
        return indices


@dataclass
class AdapterKeys:
    bottleneck: int = key(64, "hidden width of each bottleneck adapter")
    scale: float = key(1.0, "adapter output scale")

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"adapter.bottleneck={self.bottleneck}: must be at least 1")


@dataclass(kw_only=True)
class StrategyKeys:
    encoder: Strategy = key("lora", "image encoder: frozen, full, lora or adapter (the prompt encoder is always frozen)")
    decoder: Strategy = key("full", "mask decoder: frozen, full, lora or adapter")
    lora: LoraKeys = group(LoraKeys, "LoRA (encoder/decoder=lora)")
    adapter: AdapterKeys = group(AdapterKeys, "bottleneck adapters (encoder/decoder=adapter)")


def target_tokens(targets: str) -> list[str]:
    tokens = [t.strip() for t in targets.split(",") if t.strip()]
    if not tokens:
        raise ValueError("lora.targets is empty: use e.g. qkv,proj")
    return tokens



@dataclass(kw_only=True)
class PromptKeys:
    prompt: PromptMode = key("none", "none = automatic masks for all classes; box / point = prompts from the labels")
    box_jitter: float = key(0.1, "box prompts: random shift of each side, as a fraction of the box size")
    num_points: int = key(1, "point prompts: positive points per class")
    num_negative: int = key(0, "point prompts: negative points per class")


@dataclass(kw_only=True)
class FinetuneConfig(ModelKeys, DataKeys, TrainKeys, StrategyKeys, PromptKeys):
    data: str = required("labeled manifest (.jsonl/.csv) or a packaged one such as demo:brain")
    out: Path = required("output folder (resumes from out/state/ when rerun)")
    num_classes: int = required("number of classes including background (binary = 2)")
    split: str | None = key("train", "manifest split to train on")
    val_split: str | None = key("val", "manifest split for validation (volume Dice); none = no validation")
    train_cases: int | None = key(None, "few-shot: train on this many labeled volumes (seeded choice)")
    class_weights: str | None = key(None, "comma list of K loss weights, background first (softmax only)")
    empty_fraction: float = key(0.2, "fraction of slices without foreground that are kept for training")
    skip_empty: float = key(0.01, "drop background-only slices whose imaged-object fraction is below this")
    augment: AugmentConfig = group(AugmentConfig, "2D augmentations (MONAI)")
    val_every: int = key(0, "steps between validations; 0 = once per epoch")
    patience: int = key(0, "stop after this many validations without a better val Dice; 0 = never")
    embedding_cache: bool = key(True, "encoder=frozen: compute image embeddings once and train the decoder on them")
    embedding_views: int = key(0, "encoder=frozen + cache: augmented views per slice to embed (0 = none)")
    export_merged: bool = key(False, "also write sam_merged.pth (LoRA merged into plain SAM weights)")
    eval_batch_size: int = key(8, "slices per forward pass in validation")

    def __post_init__(self) -> None:
        self.check_training_keys()
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: must be at least 2 (background + one class)")
        if self.class_weights is not None:
            weights = self.class_weights.split(",")
            if len(weights) != self.num_classes:
                raise ValueError(f"class_weights has {len(weights)} values but num_classes={self.num_classes}")
            try:
                [float(w) for w in weights]
            except ValueError:
                raise ValueError(f"class_weights={self.class_weights!r}: expected numbers like 0.2,1,3") from None
            if self.prompt != "none" or self.num_classes == 2:
                raise ValueError("class_weights needs prompt=none and num_classes > 2 (softmax) — drop class_weights")
        if self.grad_checkpointing and self.arch == "vit_t":
            raise ValueError("grad_checkpointing=true is for the plain-ViT encoders (vit_b/l/h, vit_tiny); "
                             "MobileSAM's TinyViT (arch=vit_t) is small enough without it — set it to false")
        # Checked before training, not after it: plain SAM weights hold neither a class head nor adapters.
        if self.export_merged and (self.prompt == "none" or "adapter" in (self.encoder, self.decoder)):
            raise ValueError("export_merged=true needs prompt=box|point and no adapters — plain SAM weights cannot "
                             "hold the automatic mode's class head or bottleneck adapters")
        if self.train_cases is not None and self.train_cases < 1:
            raise ValueError(f"train_cases={self.train_cases}: must be at least 1")

    @property
    def class_weight_values(self) -> list[float] | None:
        return None if self.class_weights is None else [float(w) for w in self.class_weights.split(",")]
