"""Keys of ``samadapt baseline`` (``samadapt baseline --help`` prints them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from samadapt.config import required, with_defaults
from samadapt.data.preprocessing import preprocessing_fields
from samadapt.data.splits import check_split_keys
from samadapt.keys import DataKeys, TrainKeys, UNetKeys, check_slicing
from samadapt.supervised import SupervisedKeys

# The slice size is a preprocessing key (a SAM stage takes it with its arch); 256 px suits the U-Net.
ImageSizeKeys = with_defaults(
    dataclasses.make_dataclass("ImageSizeKeys", preprocessing_fields(include=("image_size",)), kw_only=True),
    image_size=256,
)


@dataclass(kw_only=True)
class BaselineConfig(UNetKeys, ImageSizeKeys, SupervisedKeys, DataKeys,
                     with_defaults(TrainKeys, steps=500, lr=2e-3, weight_decay=1e-4, batch_size=8)):
    data: str = required("labeled manifest (.jsonl/.csv) or a packaged one such as demo:brain")
    out: Path = required("output folder (resumes from out/state/ when rerun)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_slicing(self, one_plane=True)
        check_split_keys(self)
        if self.grad_checkpointing:
            raise ValueError("grad_checkpointing=true recomputes SAM encoder blocks; the U-Net has none — drop it")
        levels = len(self.channel_list)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size={self.image_size}: the {levels}-level U-Net halves it {levels - 1} times — "
                             f"use a multiple of {2 ** (levels - 1)}")
