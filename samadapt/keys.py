"""Keys every training stage shares (``samadapt pretrain|finetune --help`` list them).

Kept free of torch imports so ``--help`` is instant. Stage configs inherit these groups
(``@dataclass(kw_only=True)``), so a key means the same thing in every stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints

from samadapt.config import key
from samadapt.data.preprocessing import Preprocessing
from samadapt.errors import UserError

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
    tensorboard: bool = key(True, "also write each metrics row to out/tensorboard/ (if tensorboard is installed)")

    def check_training_keys(self) -> None:
        """Called from the stage config's ``__post_init__``; ValueError becomes a one-line UserError."""
        for name in ("steps", "batch_size", "grad_accumulation", "save_every", "keep_states", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be positive")


def _preprocessing_fields() -> list[tuple[str, Any, Any]]:
    """The data layer's Preprocessing fields (minus image_size, a model key) as stage keys: one source."""
    hints = get_type_hints(Preprocessing)
    return [(f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
            for f in dataclasses.fields(Preprocessing) if f.name != "image_size"]


DataKeys = dataclasses.make_dataclass("DataKeys", [
    ("split", str | None, key(None, "use only manifest rows of this split (train/val/test); none = all rows")),
    ("cache_dir", str | None, key(None, "slice cache folder; none = $SAMADAPT_CACHE or ~/.cache/samadapt")),
    *_preprocessing_fields(),
], kw_only=True)
DataKeys.__doc__ = "Which manifest rows to read and how volumes become slices (see samadapt.data)."


def preprocessing(config: Any) -> Preprocessing:
    """The stage config's :class:`Preprocessing` (its own checks become one-line UserErrors)."""
    try:
        return Preprocessing(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Preprocessing)})
    except ValueError as exc:
        raise UserError(str(exc)) from None
