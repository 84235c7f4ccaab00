"""On paper: ViT-B 1024 px LoRA fine-tuning throughput on a GPU, from the model's FLOPs (JSON on stdout).

    python bench/bench_flops.py [--mfu 0.4]

FLOPs of one training step (forward + backward, batch 1) of the fine-tune stage's model (vit_b 1024,
encoder=lora decoder=full prompt=none, its DiceCE loss) are counted by ``samadapt.cost`` (what
``samadapt run --dry-run`` prints): ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes
only, no compute: exact op counts in seconds). With LoRA the backward pass computes input gradients through
every encoder block but weight gradients only for LoRA and the decoder, so backward ≈ 1x forward instead of
2x; grad checkpointing adds one more encoder forward. Images/s = peak dense bf16 FLOP/s x MFU ÷ FLOPs per image.
The optimiser step (a few million parameters) is negligible.
"""

from __future__ import annotations

import argparse

from common import entry, print_json

from samadapt.cost import PEAK_BF16_TFLOPS, count_step, strategy_model
from samadapt.keys import AdapterKeys, LoraKeys

SIZE = 1024


def count(grad_checkpointing: bool) -> dict[str, float]:
    """GFLOPs of forward and forward+backward for one 1024 px image (``samadapt.cost``: the meta device)."""
    model = strategy_model("vit_b", SIZE, 2, "none", "lora", "full", LoraKeys(), AdapterKeys(), grad_checkpointing)
    flops = count_step(model, SIZE, batch=1)
    return {"forward_gflop": round(flops.forward / 1e9, 1), "backward_gflop": round(flops.backward / 1e9, 1),
            "step_gflop": round(flops.step / 1e9, 1)}


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
