"""Keys every training stage shares (``samadapt pretrain|finetune --help`` list them).

Kept free of torch imports so ``--help`` is instant. Stage configs inherit these groups
(``@dataclass(kw_only=True)``), so a key means the same thing in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from samadapt.config import key

Arch = Literal["vit_b", "vit_l", "vit_h", "vit_t", "vit_tiny"]


@dataclass(kw_only=True)
class ModelKeys:
    arch: Arch = key("vit_b", "SAM backbone: vit_b, vit_l, vit_h, vit_t (MobileSAM TinyViT), vit_tiny (tests)")
    checkpoint: str | None = key(
        None, "SAM-format weights (.pth official layout or .safetensors); none = random initialisation"
    )
    image_size: int = key(1024, "input size in px (256/512 resize pos-embed and rel-pos tables of the weights)")


@dataclass(kw_only=True)
class TrainKeys:
    steps: int = key(1000, "optimiser steps (each = batch_size x grad_accumulation x processes images)")
    batch_size: int = key(2, "images per process per micro-batch")
    lr: float = key(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = key(0.05, "AdamW weight decay (not applied to norms, biases, pos-embeddings)")
    warmup_steps: int = key(0, "linear warm-up steps before the cosine decay")
    max_grad_norm: float | None = key(1.0, "clip gradients to this norm; none = no clipping")
    grad_accumulation: int = key(1, "micro-batches per optimiser step")
    mixed_precision: Literal["no", "bf16", "fp16"] = key("no", "autocast precision (fp16 needs a GPU)")
    grad_checkpointing: bool = key(False, "recompute encoder blocks in backward to save memory")
    seed: int = key(0, "seed for weights, data order and augmentations")
    num_workers: int = key(0, "DataLoader worker processes per training process")
    save_every: int = key(200, "steps between resumable training states in out/state/step_<N>/")
    keep_states: int = key(2, "how many training states to keep (oldest deleted)")
    resume: bool = key(True, "resume from the newest out/state/step_<N>/ if one exists")
    log_every: int = key(10, "steps between rows of out/metrics.csv")

    def check_training_keys(self) -> None:
        """Called from the stage config's ``__post_init__``; ValueError becomes a one-line UserError."""
        for name in ("steps", "batch_size", "grad_accumulation", "save_every", "keep_states", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be positive")


@dataclass(kw_only=True)
class DataKeys:
    split: str | None = key(None, "use only manifest rows of this split (train/val/test); none = all rows")
    plane: Literal["axial", "coronal", "sagittal", "all"] = key(
        "axial", "slicing plane after reorienting to the canonical orientation (all = every plane, SSL)"
    )
    spacing: float | None = key(None, "in-plane pixel size in mm to resample to; none = fit the slice to image_size")
    window: str | None = key(None, "CT intensity window: soft_tissue, lung, bone, brain or 'W,L'; none = modality default")
    channel: int | None = key(None, "channel to use from 4D images")
    cache_dir: str | None = key(None, "slice cache folder; none = $SAMADAPT_CACHE or ~/.cache/samadapt")
