"""Keys of ``samadapt evaluate`` and ``samadapt predict``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from samadapt.config import key, required
from samadapt.keys import Arch, DataKeys


@dataclass(kw_only=True)
class InferenceKeys(DataKeys):
    """What a model needs at inference. For a finetune folder the preprocessing, arch, image size and
    classes come from its stage_output.json; the keys below matter for a plain SAM checkpoint only."""

    model: str = required("finetune output folder, or a SAM checkpoint (.pth/.safetensors) for zero-shot")
    out: Path = required("output folder")
    batch_size: int = key(8, "slices per forward pass")
    arch: Arch = key("vit_b", "checkpoint models only: SAM backbone")
    image_size: int = key(1024, "checkpoint models only: input size in px")
    num_classes: int | None = key(
        None, "checkpoint models only: classes incl. background (none = from the manifest's labels.json)")
    seed: int = key(0, "seed for prompts drawn from the labels")


@dataclass(kw_only=True)
class EvaluateConfig(InferenceKeys):
    data: str = required("labeled manifest (.jsonl/.csv) or a packaged one such as demo:brain")
    split: str | None = key("test", "manifest split to evaluate; none = all rows")
    prompt: Literal["none", "box", "point"] | None = key(
        None, "none = automatic; box / point = prompts from the reference labels; none given = as trained")
    box_jitter: float = key(0.0, "box prompts: random shift of each side as a fraction of the box size")
    num_points: int = key(1, "point prompts: positive points per class")
    num_negative: int = key(0, "point prompts: negative points per class")
    nsd_tolerance_mm: float = key(2.0, "surface tolerance of the NSD in mm")
    overlays: bool = key(True, "write overlays/<case>.png for the worst, median and best case")

    def __post_init__(self) -> None:
        if self.nsd_tolerance_mm <= 0:
            raise ValueError(f"nsd_tolerance_mm={self.nsd_tolerance_mm}: must be positive")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be at least 1")


@dataclass(kw_only=True)
class PredictConfig(InferenceKeys):
    input: str = required("an image file, a folder of images / DICOM series, or a manifest")
    modality: str | None = key(None, "modality of the inputs (MR, CT); none = the manifest's or the training data's")
    save_probabilities: bool = key(False, "also write class probabilities as a 4D image per case")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be at least 1")
