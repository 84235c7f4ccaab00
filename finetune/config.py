"""Keys of ``samadapt finetune`` (``samadapt finetune --help`` prints them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samadapt.config import group, key, required
from samadapt.data.augment import AugmentConfig
from samadapt.keys import DataKeys, PromptKeys, SegmenterKeys, TrainKeys, check_slicing


@dataclass(kw_only=True)
class FinetuneConfig(SegmenterKeys, DataKeys, TrainKeys, PromptKeys):
    data: str = required("labeled manifest (.jsonl/.csv) or a packaged one such as demo:brain")
    out: Path = required("output folder (resumes from out/state/ when rerun)")
    split: str | None = key("train", "manifest split to train on")
    val_split: str | None = key("val", "manifest split for validation (volume Dice); none = no validation")
    train_cases: int | None = key(
        None, "few-shot: train on this many labeled volumes (seeded choice)", bounds="[1, inf)"
    )
    class_weights: str | None = key(None, "comma list of K loss weights, background first (softmax only)")
    empty_fraction: float = key(
        0.2, "fraction of slices without foreground that are kept for training", bounds="[0, 1]"
    )
    skip_empty: float = key(
        0.01, "drop background-only slices whose imaged-object fraction is below this", bounds="[0, 1)"
    )
    augment: AugmentConfig = group(AugmentConfig, "2D augmentations (MONAI)")
    val_every: int = key(0, "steps between validations; 0 = once per epoch", bounds="[0, inf)")
    patience: int = key(0, "stop after this many validations without a better val Dice; 0 = never", bounds="[0, inf)")
    embedding_cache: bool = key(True, "encoder=frozen: compute image embeddings once and train the decoder on them")
    embedding_views: int = key(
        0, "encoder=frozen + cache: augmented views per slice to embed (0 = none)", bounds="[0, 64]"
    )
    export_merged: bool = key(False, "also write sam_merged.pth (LoRA merged into plain SAM weights)")
    eval_batch_size: int = key(8, "slices per forward pass in validation", bounds="[1, inf)")

    def __post_init__(self) -> None:
        check_slicing(self, one_plane=True)
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
            raise ValueError(
                "grad_checkpointing=true is for the plain-ViT encoders (vit_b/l/h, vit_tiny); "
                "MobileSAM's TinyViT (arch=vit_t) is small enough without it — set it to false"
            )
        # Checked before training, not after it: plain SAM weights hold neither a class head nor adapters.
        if self.export_merged and (self.prompt == "none" or "adapter" in (self.encoder, self.decoder)):
            raise ValueError(
                "export_merged=true needs prompt=box|point and no adapters — plain SAM weights cannot "
                "hold the automatic mode's class head or bottleneck adapters"
            )

    @property
    def class_weight_values(self) -> list[float] | None:
        return None if self.class_weights is None else [float(w) for w in self.class_weights.split(",")]
