"""The preprocessing parameters: one frozen dataclass, hashed into the slice-cache key.

Field names are the CLI keys of the stages (``plane=``, ``spacing=``, ``window=``, ``channel=`` ...).
Kept free of torch/SimpleITK imports so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

# Bump when the slice computation changes, so old cache entries are not reused.
PREPROCESSING_VERSION = 1
Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[str, ...] = get_args(Plane)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = field(
        default=1024, metadata={"help": "side of the square model input in px", "bounds": "[16, 4096]"}
    )
    plane: Literal[Plane, "all"] = field(
        default="axial", metadata={"help": "slicing plane after reorienting to LPS (all = every plane, SSL)"}
    )
    spacing: float | None = field(
        default=None,
        metadata={
            "help": "in-plane pixel size in mm to resample to; none = fit the slice to image_size",
            # finer than 0.05 mm a 25 cm slice is > 5000 px a side before it is cropped
            "bounds": "[0.05, 50]",
        },
    )
    window: str | None = field(
        default=None,
        metadata={
            "help": "intensity window: soft_tissue, lung, bone, brain or 'W,L' (HU); "
            "none = modality default (CT soft_tissue, MR percentiles)"
        },
    )
    channel: int | None = field(
        default=None, metadata={"help": "volume to use from 4D / multi-channel images", "bounds": "[0, inf)"}
    )
    mr_foreground: Literal["otsu", "nonzero"] = field(
        default="otsu",
        metadata={"help": "MR voxels whose 0.5-99.5 percentiles set the scale: Otsu head mask or non-zero voxels"},
    )
    resample_labels: bool = field(
        default=False, metadata={"help": "resample labels whose geometry differs from the image (nearest)"}
    )

    def __post_init__(self) -> None:
        from samadapt.config import check_bounds
        from samadapt.data.normalise import parse_window

        for name, info in ((f.name, f.metadata) for f in dataclasses.fields(self)):
            check_bounds(name, getattr(self, name), info.get("bounds"))
        if self.plane not in PLANES + ("all",):
            raise ValueError(f"plane={self.plane!r}: use axial, coronal, sagittal or all")
        if self.window is not None and not all(math.isfinite(v) for v in parse_window(self.window)):
            raise ValueError(f"window={self.window!r}: width and level must be finite numbers (HU)")

    @property
    def planes(self) -> tuple[str, ...]:
        """The concrete planes this preprocessing cuts (three for ``plane="all"``)."""
        return PLANES if self.plane == "all" else (self.plane,)

    def key(self) -> str:
        """Stable 16-hex-digit hash of every field (and the preprocessing code version)."""
        payload = json.dumps({"version": PREPROCESSING_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def preprocessing_fields(include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """Preprocessing's fields as ``(name, type, field)`` for ``dataclasses.make_dataclass``: how a command's
    config declares these keys without repeating them (``include`` = only those; ``exclude`` = all but those)."""
    hints = get_type_hints(Preprocessing)
    return [
        (f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(Preprocessing)
        if (not include or f.name in include) and f.name not in exclude
    ]
