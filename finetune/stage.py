"""``samadapt finetune``: fine-tune SAM on labeled slices under one of the study's strategies.

Data (labeled slices, class-balanced sampling) → :class:`SamSegmenter` with the strategy applied
(frozen / full / LoRA via peft / bottleneck adapters, per part) → the shared
:class:`~samadapt.training.Trainer` → volume-level validation every epoch (best checkpoint, early
stopping) → ``out/adapter/`` (peft), ``out/trainable.safetensors``, optional ``out/sam_merged.pth``,
``out/metrics.csv``, ``out/validation.json``, ``out/splits.json`` (the case split, see
:mod:`samadapt.data.splits`) and ``out/stage_output.json`` last.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samadapt.data.device_augment import augment_on_device
from samadapt.data.manifest import resolve_manifest
from samadapt.finetune.config import FinetuneConfig
from samadapt.finetune.embeddings import EmbeddingDataset
from samadapt.inference import PromptSettings, prompt_generator
from samadapt.io import cache_root
from samadapt.keys import PromptKeys
from samadapt.models.checkpoints import load_sam, save_sam_checkpoint, save_sam_safetensors
from samadapt.models.finetuned import load_finetuned, merge_into_sam, save_finetuned
from samadapt.models.pretrained import resolve_checkpoint
from samadapt.models.prompts import prompts_from_labels
from samadapt.models.segmenter import SamSegmenter
from samadapt.models.strategies import apply_strategy, parameter_summary, parameter_summary_line
from samadapt.stage_record import StageOutput, begin_stage, finish_stage
from samadapt.stages import STAGES
from samadapt.supervised import (
    Validator,
    labeled_slices,
    split_cases,
    steps_per_epoch,
    validation_hook,
)
from samadapt.training import Trainer, layer_lr_scale, make_accelerator, param_groups

FINETUNE = STAGES["finetune"]


def batch_prompts(config: FinetuneConfig, labels: torch.Tensor, case_ids, slices):
    """Prompts for a training batch, fixed by the batch's slices (so a resumed run sees the same ones)."""
    if config.prompt == "none":
        return None
    rng = prompt_generator(config.seed, *(f"{c}:{int(s)}" for c, s in zip(case_ids, slices)))
    return prompts_from_labels(config.prompt, labels, config.num_classes, rng, box_jitter=config.box_jitter,
                               num_positive=config.num_points, num_negative=config.num_negative)


def make_validator(config: FinetuneConfig, cases: list, accelerator) -> Validator:
    """Validation with the training's prompt mode (boxes without jitter); the best weights go to ``out``."""
    keys = PromptKeys(box_jitter=0.0, num_points=config.num_points, num_negative=config.num_negative)
    return Validator(config, cases, PromptSettings(config.prompt, keys, config.seed), accelerator,
                     lambda model: save_finetuned(model, config.out), FINETUNE.path(config.out, "validation"))


def build_model(config: FinetuneConfig, save_base_to: Path | None = None) -> SamSegmenter:
    """SAM with the configured strategy applied; a random base (``checkpoint`` none) is saved first when asked,
    because its frozen parts are part of the trained model."""
    torch.manual_seed(config.seed)  # a random base is then the same on every process and after a resume
    sam = load_sam(config.arch, config.checkpoint, image_size=config.image_size)
    if save_base_to is not None and config.checkpoint is None:
        save_sam_safetensors(sam, config.arch, save_base_to)
    segmenter = SamSegmenter(sam, config.num_classes, config.prompt, config.grad_checkpointing)
    return apply_strategy(segmenter, config.encoder, config.decoder, config.lora, config.adapter)


def make_loss_fn(config: FinetuneConfig, segmenter: SamSegmenter, use_embeddings: bool):
    """The training loss for :meth:`Trainer.fit`: ``loss_fn(prepared_model, batch) -> (loss, logs)``.

    ``segmenter`` is the plain (unprepared) model: its loss and label helpers hold no parameters. The train
    Dice is computed lazily, only for the steps whose logs become a metrics row."""
    def loss_fn(prepared, batch):
        if not use_embeddings:  # before the prompts: they come from the (augmented) labels
            batch = augment_on_device(config.augment, batch)
        labels = batch["label"]
        prompts = batch_prompts(config, labels.cpu(), batch["case_id"], batch["slice"])
        prompts = prompts.to(labels.device) if prompts is not None else None
        if use_embeddings:
            logits = prepared(embeddings=batch["embedding"], prompts=prompts)
        else:
            logits = prepared(batch["image"], prompts)  # [0, 1] slices: the model normalises them itself
        present = None if prompts is None else prompts.present
        loss = segmenter.loss_fn(logits, labels, present, config.class_weight_values)
        detached = logits.detach()  # not the graph: the closure outlives this step
        return loss, lambda: {"train_dice": segmenter.batch_dice(detached, labels, present)}
    return loss_fn


def training_data(config: FinetuneConfig, model: SamSegmenter, train_cases: list, accelerator):
    """The labeled slices and what the loop trains on: the slices, or (frozen encoder + embedding cache)
    their image embeddings computed once."""
    use_embeddings = config.encoder == "frozen" and config.embedding_cache
    slices = labeled_slices(config, train_cases, augment=not use_embeddings)
    if not use_embeddings:
        return slices, slices
    with accelerator.main_process_first():
        dataset = EmbeddingDataset(slices, model.to(accelerator.device), Path(config.cache_dir or cache_root()),
                                   config.embedding_views, config.augment, config.seed,
                                   config.eval_batch_size, accelerator.device)
    if accelerator.is_main_process:
        views = config.embedding_views
        print(f"embedding cache: {len(dataset)} slices, "
              + (f"{views} pre-augmented views each" if views else "no augmentation (embedding_views=0)"))
    return slices, dataset


def run(config: FinetuneConfig) -> StageOutput:
    manifest = resolve_manifest(config.data)
    stage_run = begin_stage("finetune", config, data=manifest, checkpoint=resolve_checkpoint(config.checkpoint))
    accelerator = make_accelerator(config)
    out = Path(config.out)
    split = split_cases(config, manifest, FINETUNE.path(out, "splits"), accelerator.is_main_process)
    train_cases, val_cases = split.train, split.val
    model = build_model(config, FINETUNE.path(out, "base_weights") if accelerator.is_main_process else None)
    summary = parameter_summary(model)
    if accelerator.is_main_process:
        print(f"strategy encoder={config.encoder} decoder={config.decoder} prompt={config.prompt}: "
              f"{parameter_summary_line(summary)}")
    slices, dataset = training_data(config, model, train_cases, accelerator)
    loss_fn = make_loss_fn(config, model, use_embeddings=dataset is not slices)
    validator = make_validator(config, val_cases, accelerator) if val_cases else None
    every = config.val_every or steps_per_epoch(dataset, config, accelerator)

    trainer = Trainer(accelerator, config, out)
    groups = param_groups(model, config.weight_decay, layer_lr_scale(model, config.layer_decay))
    result = trainer.fit(model, dataset, loss_fn, groups=groups, sample_weights=slices.sample_weights(),
                         after_step=validation_hook(validator, every, config.steps),
                         stateful={"validator": validator} if validator else None, desc="finetune")
    accelerator.wait_for_everyone()
    record = None
    if accelerator.is_main_process:
        artifacts = _export(config, accelerator.unwrap_model(trainer.model).cpu(), validator is not None)
        val = validator.state if validator else {}
        metrics = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "train_seconds": round(result.seconds, 2),
            "train_volumes": len(train_cases),
            "val_volumes": len(val_cases),
            "train_slices": len(slices),
            "best_val_dice": val.get("best_dice"),
            "best_step": val.get("best_step"),
            "input_norm": model.input_norm,  # what the encoder was fed (samadapt.models.normalisation)
            "trainable_params": summary["trainable"],
            "total_params": summary["total"],
            "train_cases": [c.id for c in train_cases],
            "val_cases": [c.id for c in val_cases],
            "split": split.summary,
            "train_modalities": sorted({c.modality for c in train_cases}),
            "resumed_from_step": result.resumed_from,
            "processes": accelerator.num_processes,
        }
        record = finish_stage("finetune", config, stage_run, artifacts, metrics)
    accelerator.wait_for_everyone()
    return record


def _export(config: FinetuneConfig, model: SamSegmenter, validated: bool) -> dict[str, Path]:
    """Write the final weights (the validator already saved the best validated ones) and optional merged SAM;
    returns the artifacts by registry name."""
    out = Path(config.out)
    if not validated:
        save_finetuned(model, out)
    names = ["trainable", "metrics", "adapter", "base_weights", "validation", "splits"]
    if config.export_merged:
        best = _best_model(config, out) if validated else model
        save_sam_checkpoint(merge_into_sam(best), config.arch, FINETUNE.path(out, "sam_merged"))
        names.append("sam_merged")
    return {name: FINETUNE.path(out, name) for name in names if FINETUNE.path(out, name).exists()}


def _best_model(config: FinetuneConfig, out: Path):
    """The best validated model, rebuilt from what the validator saved."""
    base = config.checkpoint if config.checkpoint else FINETUNE.path(out, "base_weights")
    sam = load_sam(config.arch, base, config.image_size)
    return load_finetuned(SamSegmenter(sam, config.num_classes, config.prompt), out, config)
