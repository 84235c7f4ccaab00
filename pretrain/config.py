"""Keys of ``samadapt pretrain`` (``samadapt pretrain --help`` prints them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from samadapt.config import key, required, with_defaults
from samadapt.keys import AugmentKeys, DataKeys, ModelKeys, TrainKeys, check_slicing

Variant = Literal["drop", "patch_drop", "mask_token"]
Target = Literal["pixels", "features", "both"]


@dataclass(kw_only=True)
class PretrainConfig(
    ModelKeys, with_defaults(DataKeys, plane="all"), with_defaults(TrainKeys, lr=1.5e-4, warmup_steps=50), AugmentKeys
):
    data: str = required("unlabeled manifest (.jsonl/.csv) or a packaged one such as demo:ssl")
    out: Path = required("output folder (resumes from out/state/ when rerun)")
    mask_ratio: float = key(0.75, "fraction of the image masked (rounded to whole mask units)", bounds="(0, 1)")
    variant: Variant = key(
        "drop", "drop = encoder skips masked windows (MAE, fastest); patch_drop = skips masked 16-px patches, the "
        "same count in every window (UM-MAE); mask_token = SimMIM-style full grid"
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
    layer_decay: float = key(1.0, "layer-wise lr decay for encoder blocks (1.0 = none, 0.75 typical)", bounds="(0, 1]")
    skip_empty: float = key(0.05, "skip slices whose foreground fraction is below this (0 = keep all)", bounds="[0, 1)")
    preview_every: int = key(
        100, "steps between reconstruction previews in out/previews/ (0 = never)", bounds="[0, inf)"
    )

    def __post_init__(self) -> None:
        check_slicing(self, one_plane=False)
        if self.target != "pixels" and self.checkpoint is None:
            raise ValueError(f"target={self.target} keeps the features of the starting encoder, but checkpoint=none "
                             "starts from random weights — give checkpoint= or use target=pixels")
