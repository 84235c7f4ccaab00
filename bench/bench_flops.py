"""On paper: ViT-B 1024 px LoRA fine-tuning throughput on a GPU, from the model's FLOPs (JSON on stdout).

    python bench/bench_flops.py [--mfu 0.4]

FLOPs of one training step (forward + backward, batch 1) of the fine-tune stage's model (vit_b 1024,
encoder=lora decoder=full prompt=none, its DiceCE loss) are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only, no compute: exact op
counts in seconds). With LoRA the backward pass computes input gradients through every encoder block but
weight gradients only for LoRA and the decoder, so backward ≈ 1x forward instead of 2x; grad
checkpointing adds one more encoder forward. Images/s = peak dense bf16 FLOP/s x MFU ÷ FLOPs per image.
The optimiser step (a few million parameters) is negligible.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import entry, print_json
from torch.utils.flop_counter import FlopCounterMode

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0}
SIZE = 1024


def count(grad_checkpointing: bool) -> dict[str, float]:
    """GFLOPs of forward and forward+backward for one 1024 px image."""
    from samadapt.data import to_sam_input
    from samadapt.finetune.config import FinetuneConfig
    from samadapt.finetune.stage import build_model

    with tempfile.TemporaryDirectory() as tmp:
        config = FinetuneConfig(data="demo:brain", out=Path(tmp), num_classes=2, arch="vit_b", image_size=SIZE,
                                encoder="lora", decoder="full", prompt="none", batch_size=1,
                                grad_checkpointing=grad_checkpointing)
        with torch.device("meta"):  # parameters without storage: the 90 M weights are never initialised
            model = build_model(config)
    model.train()
    images = to_sam_input(torch.rand(1, 1, SIZE, SIZE, device="meta"))
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as forward_counter:
        # What the stage's make_loss_fn computes for prompt=none (no prompts, no class weights), called directly:
        # make_loss_fn copies the labels to the CPU to draw prompts, which a meta tensor cannot be.
        logits = model(images, None)
        loss = model.loss_fn(logits, labels)
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    forward, backward = forward_counter.get_total_flops(), backward_counter.get_total_flops()
    return {"forward_gflop": round(forward / 1e9, 1), "backward_gflop": round(backward / 1e9, 1),
            "step_gflop": round((forward + backward) / 1e9, 1)}


def measure(mfu: float = 0.4) -> dict:
    plain, recompute = count(False), count(True)
    gpus = {name: round(peak * 1e12 * mfu / (plain["step_gflop"] * 1e9), 1) for name, peak in PEAK_BF16_TFLOPS.items()}
    detail = {"model": "vit_b 1024 encoder=lora decoder=full prompt=none, batch 1", "mfu": mfu,
              "peak_bf16_tflops": PEAK_BF16_TFLOPS, "flops": plain, "flops_grad_checkpointing": recompute,
              "images_per_s": gpus,
              "images_per_s_grad_checkpointing": {
                  name: round(peak * 1e12 * mfu / (recompute["step_gflop"] * 1e9), 1)
                  for name, peak in PEAK_BF16_TFLOPS.items()}}
    return entry(gpus["A100"], "report", detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args()
    print_json({"gpu_estimate_a100_images_per_s": measure(args.mfu)})


if __name__ == "__main__":
    main()
