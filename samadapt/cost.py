"""On-paper cost of a fine-tune: FLOPs of one training step, counted on the meta device, and the GPU time they take.

The stage's model (arch, image size, strategy, prompt mode, grad checkpointing) is built on the meta device —
parameters without storage, so even vit_h is never initialised — and one forward + backward of its loss on a
training batch runs under ``torch.utils.flop_counter.FlopCounterMode``: exact matmul/conv FLOP counts from
shapes alone, in seconds. With a frozen encoder and the embedding cache, a step decodes cached embeddings
only; the encoder's forward is then a one-time cost per cached slice (and view), given separately. Time =
FLOPs ÷ (peak dense bf16 FLOP/s x MFU); validation and data loading are not included.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from samadapt.keys import TINY_VIT_ARCHS

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0}  # dense, no sparsity: the vendors' data sheets
ESTIMATE_GPU = "A100"
ESTIMATE_MFU = 0.35  # a realistic fraction of peak for ViT fine-tuning in bf16 (bench/gpu.py measures it)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step of ``batch`` images: forward, backward, and (embedding cache only) the
    one-time encoder forward per cached slice."""

    forward: int
    backward: int
    batch: int
    encoder_per_slice: int = 0

    @property
    def step(self) -> int:
        return self.forward + self.backward


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (matmuls, convolutions, attention) with grouped convolutions' backward counted right."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """``aten.convolution_backward``: torch 2.14's own formula counts the weight gradient as a dense convolution
    over all input x output channels, ignoring ``groups`` — ``channels`` times too many for TinyViT's depthwise
    convolutions (LiteMedSAM encoder=full: 242 GFLOP of convolution backward for 19 GFLOP forward). The weight
    gradient costs what the forward convolution costs; the input gradient is counted as torch counts it."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, list(x_shape), not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def strategy_model(arch: str, image_size: int, num_classes: int, prompt: str, encoder: str, decoder: str,
                   lora: Any, adapter: Any, grad_checkpointing: bool = False):
    """The fine-tune stage's model (``finetune.stage.build_model`` for checkpoint=none) on the meta device."""
    from samadapt.models.segmenter import SamSegmenter
    from samadapt.models.strategies import apply_strategy

    with torch.device("cpu" if arch in TINY_VIT_ARCHS else "meta"):
        segmenter = SamSegmenter(copy.deepcopy(_base_sam(arch, image_size)), num_classes, prompt, grad_checkpointing)
        return apply_strategy(segmenter, encoder, decoder, lora, adapter).to("meta")


@functools.cache
def _base_sam(arch: str, image_size: int):
    """A random ``Sam`` to copy: the strategy grid's cells share it (building TinyViT takes seconds)."""
    from samadapt.models.checkpoints import load_sam

    # TinyViT's constructor reads values back (``.item()``), which meta tensors cannot: its 10 M parameters are
    # built on the CPU (moved to meta with the strategy); the plain ViTs (up to 640 M) are never initialised.
    with torch.device("cpu" if arch in TINY_VIT_ARCHS else "meta"):
        return load_sam(arch, None, image_size=image_size)


def count_step(model, image_size: int, batch: int, use_embeddings: bool = False) -> StepFlops:
    """FLOPs of one training step of ``model`` (from :func:`strategy_model`) on ``batch`` slices of
    ``image_size`` px: forward and loss, then backward; ``use_embeddings``: decoding cached embeddings."""
    from samadapt.models.prompts import prompts_from_labels

    model.train()
    labels = torch.zeros(batch, image_size, image_size, dtype=torch.long)  # every class as one square, on the CPU:
    quarter = image_size // 4  # prompts are drawn from real label values, which meta tensors do not hold
    for value in range(1, model.num_classes):
        labels[:, quarter + value : 3 * quarter, quarter : 3 * quarter - value] = value
    prompts = prompts_from_labels(model.prompt, labels, model.num_classes)
    if prompts is not None:  # which classes are prompted stays on the CPU: the decoder reads it back (.tolist())
        prompts = replace(prompts.to("meta"), present=prompts.present)
    present = None if prompts is None else prompts.present
    images = torch.rand(batch, 1, image_size, image_size, device="meta")
    encoder_per_slice = 0
    with flop_counter() as forward_counter:
        if use_embeddings:
            with torch.no_grad(), flop_counter() as encoder_counter:
                embeddings = model.embed(images[:1])
            encoder_per_slice = encoder_counter.get_total_flops()
            logits = model(embeddings=embeddings.expand(batch, -1, -1, -1), prompts=prompts)
        else:
            logits = model(images, prompts)
        loss = model.loss_fn(logits, labels.to("meta"), present)
    with flop_counter() as backward_counter:
        loss.backward()
    forward = forward_counter.get_total_flops() - encoder_per_slice  # the outer counter saw the encoder too
    return StepFlops(forward, backward_counter.get_total_flops(), batch, encoder_per_slice)


def finetune_flops(config) -> StepFlops:
    """FLOPs of one training step of the fine-tune ``config`` describes (a ``FinetuneConfig``)."""
    model = strategy_model(config.arch, config.image_size, config.num_classes, config.prompt, config.encoder,
                           config.decoder, config.lora, config.adapter, config.grad_checkpointing)
    # Counted for one image and scaled: FLOPs are linear in the batch (vit_t_lite, 8 images: 7.99994 x 1) while
    # the counting time is not — the prompted decoder runs image by image, so its ops are dispatched per image.
    one = count_step(model, config.image_size, 1, config.trains_on_embeddings)
    scale = config.batch_size
    return StepFlops(one.forward * scale, one.backward * scale, config.batch_size, one.encoder_per_slice)


def gpu_seconds(flops: float, gpu: str = ESTIMATE_GPU, mfu: float = ESTIMATE_MFU) -> float:
    """Seconds ``flops`` take at ``gpu``'s peak dense bf16 rate x ``mfu``."""
    return flops / (PEAK_BF16_TFLOPS[gpu] * 1e12 * mfu)


def finetune_cost_line(config) -> str:
    """One line for ``samadapt run --dry-run``: training FLOPs of the fine-tune and their time on a GPU."""
    flops = finetune_flops(config)
    total = flops.step * config.steps
    line = (f"cost: {flops.step / 1e12:.3g} TFLOP/step x {config.steps} steps = {total / 1e15:.3g} PFLOP"
            f" ≈ {gpu_seconds(total) / 60:.3g} min on an {ESTIMATE_GPU} (bf16 {PEAK_BF16_TFLOPS[ESTIMATE_GPU]:g}"
            f" TFLOP/s x {ESTIMATE_MFU:.0%} MFU)")
    if flops.encoder_per_slice:
        line += f" + encoder {flops.encoder_per_slice / 1e9:.3g} GFLOP per cached slice"
    return line
