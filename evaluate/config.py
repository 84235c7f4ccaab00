"""Keys of ``samadapt evaluate`` and ``samadapt predict``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
        "checkpoint models and evaluate predictions=: classes incl. background (none = from the manifest's "
        "labels.json)",
        bounds="[2, 256]",
    )

    def __post_init__(self) -> None:
        check_slicing(self, one_plane=True)


@dataclass(kw_only=True)
class EvaluateConfig(with_defaults(InferenceKeys, model=None), with_defaults(PromptKeys, box_jitter=0.0)):
    """Score a model's predictions (``model=``) or a folder of masks made by anything (``predictions=``)."""

    predictions: str | None = key(
        None,
        "instead of model=: folder of predicted masks <case id>.nii.gz (or .nii/.nrrd/.mha) on the reference "
        "labels' voxel grid, e.g. nnU-Net or MedSAM output; scored with the same rules, no model loaded",
    )
    data: str = required("labeled manifest (.jsonl/.csv) or a packaged one such as demo:brain")
    split: str | None = key("test", "manifest split to evaluate; none = all rows")
    prompt: PromptMode | None = key(
        None, "none = automatic; box / point = prompts from the reference labels; none given = as trained"
    )
    nsd_tolerances_mm: str = key("1,2", "comma list of NSD surface tolerances in mm, one NSD_<t>mm score each")
    empty_penalty: bool = key(
        True,
        "a miss or a false positive on an empty reference scores HD95 = image diagonal (mm) and NSD = 0; "
        "false = NaN, left out of the HD95/NSD means and counted",
    )
    box_protocol: Literal["slice", "volume"] = key(
        "slice",
        "prompt=box: slice = the reference's box on every slice (MedSAM); volume = one 3-D box per case and "
        "class, propagated from its middle slice by each neighbour's prediction (what a user draws)",
    )
    embedding_cache: bool = key(
        False,
        "keep each volume's image embeddings under cache_dir (or the samadapt cache), so another evaluation of "
        "the same encoder (another prompt protocol, a decoder trained on it frozen) skips the encoder",
    )
    overlays: bool = key(True, "write overlays/<case>.png for the worst, median and best case")

    def __post_init__(self) -> None:
        super().__post_init__()
        from samadapt.metrics import mm

        if (self.model is None) == (self.predictions is None):
            given = "both" if self.model is not None else "neither"
            raise ValueError(f"evaluate needs exactly one of model= (a model to run) and predictions= (a folder of "
                             f"masks to score), {given} given")
        if self.box_protocol == "volume" and self.prompt not in (None, "box"):
            raise ValueError(f"box_protocol=volume propagates box prompts — set prompt=box, not prompt={self.prompt}")
        if self.predictions is not None and self.prompt not in (None, "none"):
            raise ValueError(f"prompt={self.prompt} needs a model — predictions= are masks already made")

        # checked (ValueError → one-line UserError naming the key) and written as recorded: "1, 2.0" → "1,2"
        self.nsd_tolerances_mm = ",".join(mm(t) for t in self.nsd_tolerances)

    @property
    def nsd_tolerances(self) -> tuple[float, ...]:
        """``nsd_tolerances_mm`` as numbers."""
        from samadapt.metrics import parse_tolerances  # scipy: not at --help time

        return parse_tolerances(self.nsd_tolerances_mm)


@dataclass(kw_only=True)
class PredictConfig(InferenceKeys):
    input: str = required("an image file, a folder of images / DICOM series, or a manifest")
    modality: str | None = key(None, "modality of the inputs (MR, CT); none = the manifest's or the training data's")
    save_probabilities: bool = key(False, "also write class probabilities as a 4D image per case")
    prompts: str | None = key(
        None,
        "JSON/CSV file with one 3-D box per case and class (voxel indices or mm), propagated slice by slice: "
        "for box-prompted models and SAM checkpoints such as model=litemedsam",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modality is not None:  # ct → CT; XR is refused, not silently normalised as MR
            from samadapt.data.normalise import require_modality

            self.modality = require_modality(self.modality, "modality=")
