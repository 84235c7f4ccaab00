"""The preprocessing parameters: one frozen dataclass, hashed into the slice-cache key.

Field names are the CLI keys of the stages (``plane=``, ``spacing=``, ``window=``, ``channel=`` ...).
Kept free of torch/SimpleITK imports so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

# Bump when the slice computation changes, so old cache entries are not reused.
PREPROCESSING_VERSION = 1
PLANES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = field(default=1024, metadata={"help": "side of the square model input in px"})
    plane: Literal["axial", "coronal", "sagittal", "all"] = field(
        default="axial", metadata={"help": "slicing plane after reorienting to LPS (all = every plane, SSL)"})
    spacing: float | None = field(
        default=None, metadata={"help": "in-plane pixel size in mm to resample to; none = fit the slice to image_size"})
    window: str | None = field(
        default=None, metadata={"help": "intensity window: soft_tissue, lung, bone, brain or 'W,L' (HU); "
                                         "none = modality default (CT soft_tissue, MR percentiles)"})
    channel: int | None = field(default=None, metadata={"help": "volume to use from 4D / multi-channel images"})
    mr_foreground: Literal["otsu", "nonzero"] = field(
        default="otsu", metadata={"help": "MR voxels whose 0.5-99.5 percentiles set the scale: Otsu head mask "
                                          "or non-zero voxels"})
    resample_labels: bool = field(
        default=False, metadata={"help": "resample labels whose geometry differs from the image (nearest)"})

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size}: must be at least 16")
        if self.plane not in PLANES + ("all",):
            raise ValueError(f"plane={self.plane!r}: use axial, coronal, sagittal or all")
        if self.spacing is not None and self.spacing <= 0:
            raise ValueError(f"spacing={self.spacing}: must be a positive size in mm (or none)")

    @property
    def planes(self) -> tuple[str, ...]:
        """The concrete planes this preprocessing cuts (three for ``plane="all"``)."""
        return PLANES if self.plane == "all" else (self.plane,)

    def key(self) -> str:
        """Stable 16-hex-digit hash of every field (and the preprocessing code version)."""
        payload = json.dumps({"version": PREPROCESSING_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
