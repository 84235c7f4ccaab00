"""Keys of ``samadapt pretrain`` (``samadapt pretrain --help`` prints them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from samadapt.config import key, required, with_defaults
from samadapt.keys import (
    TINY_VIT_ARCHS,
    AugmentKeys,
    DataKeys,
    LayerDecayKeys,
    ModelKeys,
    TrainKeys,
    check_layer_decay,
    check_slicing,
)

Variant = Literal["drop", "patch_drop", "mask_token", "simmim"]
# The one variant for SAM's hierarchical TinyViT encoders (pretrain/simmim.py); the others are plain-ViT only.
TINY_VIT_VARIANT = "simmim"
# The plain-ViT default: single 16-px patches as mask units (drop's whole windows leave vit_tiny at 256 px one
# quadrant to paint three from). Measured in pipelines/ssl_ablation.yaml, 3 seeds: the same Dice as drop within
# the seed spread, HD95 lower on every seed and a third of drop's spread (README, "Self-supervised pretraining").
DEFAULT_VARIANT = "patch_drop"
Target = Literal["pixels", "features", "both"]


@dataclass(kw_only=True)
class PretrainConfig(
    ModelKeys, with_defaults(DataKeys, plane="all"), with_defaults(TrainKeys, lr=1.5e-4, warmup_steps=50),
    LayerDecayKeys, AugmentKeys,
):
    data: str = required("unlabeled manifest (.jsonl/.csv) or a packaged one such as demo:ssl")
    out: Path = required("output folder (resumes from out/state/ when rerun)")
    mask_ratio: float = key(0.75, "fraction of the image masked (rounded to whole mask units)", bounds="(0, 1)")
    variant: Variant = key(
        DEFAULT_VARIANT, "patch_drop = encoder skips masked 16-px patches, the same count in every window "
        "(UM-MAE); drop = skips masked attention windows (Hiera-style units, fastest, coarse); mask_token = "
        "SimMIM-style full grid; simmim = SimMIM for TinyViT (vit_t, vit_t_lite: mask tokens after the stem, "
        "16-px units; their only variant, chosen for them)"
    )
    target: Target = key(
        "pixels", "what the decoder predicts at masked patches: pixels (MAE), features of a frozen copy of the "
        "starting encoder (EfficientSAM's SAMI: keeps what it knew), or both"
    )
    feature_weight: float = key(1.0, "target=both: loss = pixel loss + feature_weight * feature loss",
                                bounds="(0, inf)")
    decoder_dim: int = key(256, "width of the light MAE decoder (discarded at export)", bounds="[8, 4096]")
    decoder_depth: int = key(2, "transformer blocks in the MAE decoder", bounds="[1, 64]")
    norm_pix_loss: bool = key(True, "normalise each target patch by its mean and std (MAE)")
    skip_empty: float = key(0.05, "skip slices whose foreground fraction is below this (0 = keep all)", bounds="[0, 1)")
    preview_every: int = key(
        100, "steps between reconstruction previews in out/previews/ (0 = never)", bounds="[0, inf)"
    )

    def __post_init__(self) -> None:
        check_slicing(self, one_plane=False)
        if self.target != "pixels" and self.checkpoint is None:
            raise ValueError(f"target={self.target} keeps the features of the starting encoder, but checkpoint=none "
                             "starts from random weights — give checkpoint= or use target=pixels")
        self._settle_variant()
        check_layer_decay(self)

    def _settle_variant(self) -> None:
        """TinyViT archs take variant=simmim (set while variant has its default, as resolve_model_keys sets arch):
        token dropping needs a plain ViT, and simmim masks TinyViT's stem. A contradicting value is an error."""
        if self.arch not in TINY_VIT_ARCHS:
            if self.variant == TINY_VIT_VARIANT:
                raise ValueError(f"variant=simmim is for TinyViT archs ({', '.join(TINY_VIT_ARCHS)}), arch={self.arch} "
                                 "is a plain ViT — use variant=mask_token (SimMIM on a ViT), drop or patch_drop")
            return
        if self.variant not in (DEFAULT_VARIANT, TINY_VIT_VARIANT):
            raise ValueError(f"variant={self.variant} needs a plain-ViT encoder, arch={self.arch} is a TinyViT — "
                             "drop variant= or set variant=simmim")
        self.variant = TINY_VIT_VARIANT
