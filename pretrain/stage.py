"""``samadapt pretrain``: continue training SAM's own image encoder with masked image modelling.

Data (unlabeled slices) → :class:`MaskedAutoencoderSAM` (TinyViT: :class:`SimMIMTinyViT`) around
``sam.image_encoder`` → the shared
:class:`~samadapt.training.Trainer` → export. The encoder is trained in place, so the export is SAM's
state dict with the new encoder and the input checkpoint's prompt encoder and mask decoder.

Writes ``out/sam_checkpoint.pth`` (official key layout and shapes of ``arch``; loads in stock
segment_anything), ``out/sam_checkpoint.safetensors`` (the same full SAM at the trained ``image_size``: what a
fine-tune at that size should load), ``out/encoder.safetensors`` (encoder keys at the trained size, in its metadata),
``out/metrics.csv``, ``out/previews/step_<N>.png`` and ``out/stage_output.json`` last.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samadapt.data import SliceDataset, to_sam_input
from samadapt.data.device_augment import augment_on_device
from samadapt.data.manifest import load_manifest, resolve_manifest
from samadapt.errors import UserError
from samadapt.keys import preprocessing
from samadapt.models.checkpoints import load_sam, save_safetensors, save_sam_checkpoint, save_sam_safetensors
from samadapt.models.pretrained import resolve_checkpoint
from samadapt.models.registry import input_norm
from samadapt.pretrain.config import TINY_VIT_VARIANT, PretrainConfig
from samadapt.pretrain.mae import MaskedAutoencoderSAM
from samadapt.pretrain.preview import write_preview
from samadapt.pretrain.simmim import SimMIMTinyViT
from samadapt.stage_record import StageOutput, begin_stage, finish_stage
from samadapt.stages import STAGES
from samadapt.training import Trainer, layer_lr_scale, make_accelerator, param_groups

PRETRAIN = STAGES["pretrain"]
PREVIEW_IMAGES = 4


def build_dataset(config: PretrainConfig) -> SliceDataset:
    manifest = resolve_manifest(config.data)
    cases = load_manifest(manifest, split=config.split)
    dataset = SliceDataset(cases, preprocessing(config), cache_dir=config.cache_dir, labeled=False,
                           skip_empty=config.skip_empty, seed=config.seed,
                           augment=None if config.augment.on_device else config.augment)
    if len(dataset) == 0:
        raise UserError(f"{manifest}: no usable slices (all below skip_empty={config.skip_empty}) — "
                        "check the images or lower skip_empty")
    return dataset


def build_model(config: PretrainConfig) -> tuple[torch.nn.Module, MaskedAutoencoderSAM | SimMIMTinyViT]:
    """The SAM to continue (its encoder is trained in place) and the masked model around its image encoder:
    SimMIM for TinyViT (variant=simmim, which the config settles for those archs), else the MAE."""
    torch.manual_seed(config.seed)  # checkpoint=none: the same random SAM as a finetune with this seed
    sam = load_sam(config.arch, config.checkpoint, image_size=config.image_size)
    if config.variant == TINY_VIT_VARIANT:
        return sam, SimMIMTinyViT(sam.image_encoder, mask_ratio=config.mask_ratio, input_norm=input_norm(config.arch),
                                  norm_pix_loss=config.norm_pix_loss, grad_checkpointing=config.grad_checkpointing,
                                  target=config.target, feature_weight=config.feature_weight)
    mae = MaskedAutoencoderSAM(sam.image_encoder, mask_ratio=config.mask_ratio, decoder_dim=config.decoder_dim,
                               decoder_depth=config.decoder_depth, variant=config.variant,
                               norm_pix_loss=config.norm_pix_loss, grad_checkpointing=config.grad_checkpointing,
                               target=config.target, feature_weight=config.feature_weight)
    return sam, mae


def make_loss_fn(config: PretrainConfig):
    """``loss_fn(model, batch)`` for :meth:`Trainer.fit`: :func:`masked_image_loss` of the batch augmented on
    the device (``augment.on_device``; otherwise the DataLoader augmented it)."""
    return lambda model, batch: masked_image_loss(model, augment_on_device(config.augment, batch))


def masked_image_loss(model, batch):
    """The loss for :meth:`Trainer.fit`: the MAE's loss on the masked patches; with target=both the pixel and
    feature parts are logged too (``pixels_loss``, ``features_loss`` in metrics.csv)."""
    output = model(to_sam_input(batch["image"]))
    parts = {name: part.detach() for name, part in output.parts.items()} if len(output.parts) > 1 else {}
    return output.loss, lambda: {f"{name}_loss": part.item() for name, part in parts.items()}


def preview_hook(config: PretrainConfig, dataset: SliceDataset, accelerator):
    """``after_step`` for :meth:`Trainer.fit`: every ``preview_every`` steps a reconstruction preview of the
    first slices in ``out/previews/step_<N>.png`` (main process); never stops training."""
    images = torch.stack([dataset[i]["image"] for i in range(min(PREVIEW_IMAGES, len(dataset)))])

    def after_step(step, model):
        if config.preview_every and step % config.preview_every == 0 and accelerator.is_main_process:
            write_preview(accelerator.unwrap_model(model), to_sam_input(images.to(accelerator.device)),
                          PRETRAIN.path(config.out, "previews") / f"step_{step:06d}.png")
        return False
    return after_step


def export(sam, config: PretrainConfig, artifacts: dict[str, Path]) -> None:
    """The trained SAM as the official-shape ``.pth``, the same weights at the trained size as safetensors (a
    fine-tune at that size loads them unchanged, while the ``.pth`` went through an up- and a down-sampling of
    pos_embed and the rel-pos tables) and the encoder alone."""
    save_sam_checkpoint(sam, config.arch, artifacts["sam_checkpoint"])
    save_sam_safetensors(sam, config.arch, artifacts["sam_safetensors"])
    save_safetensors({k: v.contiguous() for k, v in sam.image_encoder.state_dict().items()},
                     artifacts["encoder"], metadata={"arch": config.arch, "image_size": str(config.image_size),
                                                     "prefix": "image_encoder."})


def run(config: PretrainConfig) -> StageOutput:
    stage_run = begin_stage("pretrain", config, data=resolve_manifest(config.data),
                            checkpoint=resolve_checkpoint(config.checkpoint))
    accelerator = make_accelerator(config)
    dataset = build_dataset(config)
    sam, mae = build_model(config)
    # Only the encoder and the MAE decoder learn; SAM's prompt encoder / mask decoder are exported as loaded.
    groups = param_groups(mae, config.weight_decay, layer_lr_scale(mae, config.layer_decay))
    trainer = Trainer(accelerator, config, config.out)
    result = trainer.fit(mae, dataset, make_loss_fn(config), groups=groups, desc="pretrain",
                         after_step=preview_hook(config, dataset, accelerator))
    accelerator.wait_for_everyone()
    artifacts = {name: PRETRAIN.path(config.out, name) for name in ("sam_checkpoint", "sam_safetensors", "encoder",
                                                                      "metrics")}
    if accelerator.is_main_process:
        export(sam.cpu(), config, artifacts)
    first_loss = float(result.history[0]["loss"]) if result.history else float("nan")
    metrics = {"steps": result.steps, "first_logged_loss": first_loss, "final_loss": result.final_loss,
               "train_seconds": round(result.seconds, 2), "slices": len(dataset),
               "resumed_from_step": result.resumed_from,
               "processes": accelerator.num_processes}
    record = None
    if accelerator.is_main_process:
        record = finish_stage("pretrain", config, stage_run, artifacts, metrics)
    accelerator.wait_for_everyone()
    return record
