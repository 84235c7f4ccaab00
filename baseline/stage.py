"""``samadapt baseline``: train MONAI's 2D U-Net on the same labeled slices as ``finetune``.

Same manifest, case split (``splits.json``), preprocessing, slice sampling and augmentation as ``finetune``
(:mod:`samadapt.supervised`) → :class:`~samadapt.models.unet.UNetSegmenter` → the shared
:class:`~samadapt.training.Trainer` (Accelerate, resume, ``save_every``) → volume-level validation (best
checkpoint by val Dice, early stopping) → ``out/unet.safetensors``, ``out/metrics.csv``, ``out/validation.json``,
``out/splits.json`` and ``out/stage_output.json`` last. ``samadapt evaluate model=out`` scores it like a SAM run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samadapt.baseline.config import BaselineConfig
from samadapt.data.device_augment import augment_on_device
from samadapt.data.manifest import resolve_manifest
from samadapt.inference import AUTOMATIC
from samadapt.models.unet import UNetSegmenter, save_unet
from samadapt.stage_record import StageOutput, begin_stage, finish_stage
from samadapt.stages import STAGES
from samadapt.supervised import (
    Validator,
    labeled_slices,
    split_cases,
    steps_per_epoch,
    validation_hook,
)
from samadapt.training import Trainer, make_accelerator

BASELINE = STAGES["baseline"]


def make_loss_fn(config: BaselineConfig, model: UNetSegmenter):
    """``loss_fn(prepared_model, batch) -> (DiceCE loss, lazy train Dice)`` for :meth:`Trainer.fit`."""
    def loss_fn(prepared, batch):
        batch = augment_on_device(config.augment, batch)
        labels = batch["label"]
        logits = prepared(batch["image"])  # B x 1 x S x S in [0, 1] → B x K x S x S
        detached = logits.detach()  # not the graph: the closure outlives this step
        return model.loss_fn(logits, labels), lambda: {"train_dice": model.batch_dice(detached, labels)}
    return loss_fn


def run(config: BaselineConfig) -> StageOutput:
    manifest = resolve_manifest(config.data)
    stage_run = begin_stage("baseline", config, data=manifest)
    accelerator = make_accelerator(config)
    out = Path(config.out)
    split = split_cases(config, manifest, BASELINE.path(out, "splits"), accelerator.is_main_process)
    torch.manual_seed(config.seed)  # the same initial weights on every process and after a resume
    model = UNetSegmenter(config)
    params = sum(p.numel() for p in model.parameters())
    slices = labeled_slices(config, split.train)
    validator = None
    if split.val:
        validator = Validator(config, split.val, AUTOMATIC, accelerator, lambda m: save_unet(m, out),
                              BASELINE.path(out, "validation"))
    if accelerator.is_main_process:
        print(f"baseline: MONAI 2D U-Net channels={config.channels} res_units={config.res_units}, {params:,} "
              f"parameters; {len(slices)} training slices from {len(split.train)} volumes, "
              f"{len(split.val)} validation volumes")
    every = config.val_every or steps_per_epoch(slices, config, accelerator)
    trainer = Trainer(accelerator, config, out)
    result = trainer.fit(model, slices, make_loss_fn(config, model), sample_weights=slices.sample_weights(),
                         after_step=validation_hook(validator, every, config.steps),
                         stateful={"validator": validator} if validator else None, desc="baseline")
    accelerator.wait_for_everyone()
    record = None
    if accelerator.is_main_process:
        if validator is None:  # otherwise the validator saved the best validated weights
            save_unet(accelerator.unwrap_model(trainer.model), out)
        val = validator.state if validator else {}
        metrics = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "train_seconds": round(result.seconds, 2),
            "train_volumes": len(split.train),
            "val_volumes": len(split.val),
            "train_slices": len(slices),
            "best_val_dice": val.get("best_dice"),
            "best_step": val.get("best_step"),
            "params": params,
            "train_cases": [c.id for c in split.train],
            "val_cases": [c.id for c in split.val],
            "split": split.summary,
            "train_modalities": sorted({c.modality for c in split.train}),
            "resumed_from_step": result.resumed_from,
            "processes": accelerator.num_processes,
        }
        artifacts = {name: BASELINE.path(out, name) for name in BASELINE.artifacts if BASELINE.path(out, name).exists()}
        record = finish_stage("baseline", config, stage_run, artifacts, metrics)
    accelerator.wait_for_everyone()
    return record
