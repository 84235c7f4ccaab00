"""Keys of ``samadapt evaluate`` and ``samadapt predict``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samadapt.config import key, required, with_defaults
from samadapt.keys import ArchKeys, BatchKeys, DataKeys, PromptKeys, PromptMode, SeedKeys, check_slicing


@dataclass(kw_only=True)
class InferenceKeys(ArchKeys, DataKeys, SeedKeys, with_defaults(BatchKeys, batch_size=8)):
    """What a model needs at inference. For a finetune folder the preprocessing, arch, image size and
    classes come from its stage_output.json; ``arch``, ``image_size`` and ``num_classes`` matter for a plain
    SAM checkpoint only."""

    model: str = required("finetune output folder, or a SAM checkpoint (.pth/.safetensors) for zero-shot")
    out: Path = required("output folder")
    num_classes: int | None = key(
        None,
        "checkpoint models only: classes incl. background (none = from the manifest's labels.json)",
        bounds="[2, 256]",
    )

    def __post_init__(self) -> None:
        check_slicing(self, one_plane=True)


@dataclass(kw_only=True)
class EvaluateConfig(InferenceKeys, with_defaults(PromptKeys, box_jitter=0.0)):
    data: str = required("labeled manifest (.jsonl/.csv) or a packaged one such as demo:brain")
    split: str | None = key("test", "manifest split to evaluate; none = all rows")
    prompt: PromptMode | None = key(
        None, "none = automatic; box / point = prompts from the reference labels; none given = as trained"
    )
    nsd_tolerance_mm: float = key(2.0, "surface tolerance of the NSD in mm", bounds="(0, 1000]")
    overlays: bool = key(True, "write overlays/<case>.png for the worst, median and best case")


@dataclass(kw_only=True)
class PredictConfig(InferenceKeys):
    input: str = required("an image file, a folder of images / DICOM series, or a manifest")
    modality: str | None = key(None, "modality of the inputs (MR, CT); none = the manifest's or the training data's")
    save_probabilities: bool = key(False, "also write class probabilities as a 4D image per case")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modality is not None:  # ct → CT; XR is refused, not silently normalised as MR
            from samadapt.data.normalise import require_modality

            self.modality = require_modality(self.modality, "modality=")
