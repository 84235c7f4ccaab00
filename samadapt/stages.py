"""The stage registry: every stage's name, config, run function, summary and artifact names, in one table.

The CLI (one subcommand per stage), the pipeline runner (``command:`` and ``${stage.artifact}``), the stage
record (which files a stage folder's hash covers) and the stages themselves (where they write) all read it, so an
artifact name is spelled here and nowhere else. Adding a stage = one folder with ``config.py`` and ``stage.py``
plus one entry below. Torch-free and imported lazily: ``samadapt --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samadapt.errors import UserError

# Files the shared parts write into every training stage's folder (the training loop and the stage record).
METRICS_FILE = "metrics.csv"
STATE_DIR = "state"
TENSORBOARD_DIR = "tensorboard"
# The supervised stages' (finetune, baseline) case split (samadapt.data.splits) and validation history.
SPLITS_FILE = "splits.json"
VALIDATION_FILE = "validation.json"


def load_object(spec: str) -> Any:
    """``"samadapt.finetune.stage:run"`` → the object (imported on first use)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``config`` and ``run`` as ``module:attribute`` (loaded lazily), ``artifacts`` maps the names
    a pipeline references (``${finetune.trainable}``) to file or folder names inside the stage folder."""

    name: str
    config: str
    run: str
    summary: str
    artifacts: dict[str, str] = field(default_factory=dict)

    def config_class(self) -> type:
        return load_object(self.config)

    def run_function(self) -> Any:
        return load_object(self.run)

    def path(self, out: str | os.PathLike, artifact: str) -> Path:
        """Where this stage writes ``artifact`` inside its folder ``out``."""
        return Path(out) / self.artifacts[artifact]


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("pretrain", "samadapt.pretrain.config:PretrainConfig", "samadapt.pretrain.stage:run",
              "MAE-style self-supervised training of SAM's image encoder on unlabeled slices",
              {"sam_checkpoint": "sam_checkpoint.pth", "sam_safetensors": "sam_checkpoint.safetensors",
               "encoder": "encoder.safetensors", "metrics": METRICS_FILE, "previews": "previews"}),
    StageSpec("finetune", "samadapt.finetune.config:FinetuneConfig", "samadapt.finetune.stage:run",
              "fine-tune SAM on labeled volumes (encoder/decoder x frozen/full/lora/adapter)",
              {"adapter": "adapter", "trainable": "trainable.safetensors", "sam_merged": "sam_merged.pth",
               # the random initial SAM of a checkpoint=none run: part of the trained model
               "base_weights": "base_sam.safetensors", "validation": VALIDATION_FILE, "metrics": METRICS_FILE,
               "splits": SPLITS_FILE}),
    StageSpec("baseline", "samadapt.baseline.config:BaselineConfig", "samadapt.baseline.stage:run",
              "train a MONAI 2D U-Net on the same slices: the baseline SAM has to beat",
              {"unet": "unet.safetensors", "validation": VALIDATION_FILE, "metrics": METRICS_FILE,
               "splits": SPLITS_FILE}),
    StageSpec("evaluate", "samadapt.evaluate.config:EvaluateConfig", "samadapt.evaluate.stage:run",
              "segment a manifest's cases and score Dice / IoU / NSD / HD95 per case and class",
              {"summary": "summary.json", "per_case": "per_case.csv", "predictions": "predictions",
               "overlays": "overlays"}),
)}

# Commands that take a config like a stage but are no stage (no stage folder, no pipeline step).
COMMANDS: dict[str, StageSpec] = {
    "predict": StageSpec("predict", "samadapt.evaluate.config:PredictConfig", "samadapt.evaluate.predict:run",
                         "segment volumes and write masks with the input's geometry"),
}


def stage(name: str) -> StageSpec:
    """The registered stage ``name``, or a UserError listing the stages."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r} — stages: {', '.join(STAGES)}")
    return STAGES[name]
