"""MAE pretraining step time and peak memory: no masking vs token dropping vs mask token, and the step time of
SimMIM on TinyViT (JSON on stdout).

    python bench/bench_mae.py [--quick]                   # every config (step times side by side)
    python bench/bench_mae.py --memory ARCH SIZE VARIANT  # peak RSS of one step, run in a fresh process

One step = the pretrain stage's ``masked_image_loss`` (forward + loss) + backward + AdamW step of
:class:`MaskedAutoencoderSAM` on random slices in [0, 1] (batch 2 at 256 px, batch 1 at 1024 px; decoder 256
wide, 2 blocks). Variants: ``none`` = the full grid without masking
(``mask_token`` machinery with mask_ratio 0, so every block sees every token), ``drop`` = window-aligned
token dropping at mask 0.75, ``patch_drop`` = 16-px patch dropping with the same count in every window (the
stage default, ``DEFAULT_VARIANT``), ``mask_token`` = SimMIM full grid at mask 0.75. They share one encoder
and alternate step by step; peak memory comes from one step of each variant in its own fresh interpreter
(``VmHWM``, full run only).

``simmim``: the step time of ``variant=simmim`` (:class:`SimMIMTinyViT`, pixel target, mask 0.75)
on random weights — vit_t_lite (LiteMedSAM's encoder) at 256 px, batch 1 (~30 s a step on 2 CPU cores, so one
warm-up and one timed step); vit_t at 128 px, batch 2 in ``--quick``.
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import (
    current_rss_gib,
    entry,
    median,
    peak_rss_gib,
    print_json,
    run_json_subprocess,
    set_threads,
    step_times,
)

from samadapt.pretrain.config import DEFAULT_VARIANT
from samadapt.pretrain.stage import masked_image_loss

MASK_RATIO = 0.75
VARIANTS = ("none", "drop", "patch_drop", "mask_token")


def build(arch: str, size: int) -> tuple[dict, torch.optim.Optimizer, torch.Tensor]:
    """The three variants around ONE encoder (so they share its weights and optimiser state), an AdamW
    over all their parameters (a variant's step leaves the others' decoders without grads: skipped), and a
    batch (2 images at 256/512 px, 1 at 1024). Not the stage's ``build_model``: that builds one MAE around its own
    encoder, and ``none`` (mask_ratio 0) is no pretrain config."""
    from samadapt.models.registry import build_sam
    from samadapt.pretrain.mae import MaskedAutoencoderSAM

    torch.manual_seed(0)
    encoder = build_sam(arch, image_size=size).image_encoder
    models = {v: MaskedAutoencoderSAM(encoder, mask_ratio=0.0 if v == "none" else MASK_RATIO,
                                      variant="mask_token" if v == "none" else v) for v in VARIANTS}
    params = list({id(p): p for m in models.values() for p in m.parameters()}.values())
    images = torch.rand(2 if size <= 512 else 1, 1, size, size)
    return models, torch.optim.AdamW(params, lr=1e-4), images


def train_step(model, optimizer, images) -> None:
    """``images``: B x 1 x S x S in [0, 1], as the stage's slices."""
    masked_image_loss(model, {"image": images})[0].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_one(arch: str, size: int, variant: str) -> dict:
    """Peak RSS of one step of one variant (call in a fresh process: the peak is per process)."""
    from samadapt.models.registry import build_sam
    from samadapt.pretrain.mae import MaskedAutoencoderSAM

    set_threads()
    torch.manual_seed(0)
    model = MaskedAutoencoderSAM(build_sam(arch, image_size=size).image_encoder,
                                 mask_ratio=0.0 if variant == "none" else MASK_RATIO,
                                 variant="mask_token" if variant == "none" else variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(2 if size <= 512 else 1, 1, size, size)
    gc.collect()
    before = current_rss_gib()
    train_step(model, optimizer, images)  # the first step allocates the AdamW state too: the peak
    return {"peak_rss_gib": round(peak_rss_gib(), 3), "rss_before_step_gib": round(before, 3)}


def timing(arch: str, size: int, steps: int) -> dict:
    """Median step time per variant, the variants alternating step by step (side by side)."""
    models, optimizer, images = build(arch, size)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_index in range(steps + 1):  # round 0 is warm-up
        for variant, model in models.items():
            measured = step_times(lambda: train_step(model, optimizer, images), 1, warmup=0)
            if round_index:
                times[variant] += measured
    layout = models["drop"].layout
    return {"step_s": {v: round(median(t), 4) for v, t in times.items()}, "batch": images.shape[0],
            "steps": steps, "tokens_full_grid": models["none"].num_patches,
            "padded_grid": layout.padded_size, "windows": layout.num_units,
            "tokens_kept_incl_padding": layout.num_kept_units(MASK_RATIO) * layout.tokens_per_unit,
            "real_tokens_per_window": layout.valid.sum(1).tolist()}


def simmim_timing(quick: bool) -> dict:
    """Median step time of SimMIM on a TinyViT (see the module docstring for the sizes)."""
    from samadapt.models.registry import build_sam, input_norm
    from samadapt.pretrain.simmim import SimMIMTinyViT

    arch, size, batch, steps = ("vit_t", 128, 2, 2) if quick else ("vit_t_lite", 256, 1, 1)
    torch.manual_seed(0)
    model = SimMIMTinyViT(build_sam(arch, image_size=size).image_encoder, mask_ratio=MASK_RATIO,
                          input_norm=input_norm(arch)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.rand(batch, 1, size, size)
    seconds = median(step_times(lambda: train_step(model, optimizer, images), steps, warmup=1))
    return {"arch": arch, "image_size": size, "simmim_step_s": round(seconds, 3),
            "s_per_image": round(seconds / batch, 3), "batch": batch, "steps": steps,
            "mask_units": model.num_units, "unit_px": model.patch_size, "output_stride": model.stride}


def configs(quick: bool) -> list[tuple[str, int, int]]:
    """(arch, image size, timed steps per variant) per encoder."""
    if quick:
        return [("vit_tiny", 256, 3)]
    return [("vit_tiny", 256, 8), ("vit_tiny", 1024, 3), ("vit_b", 256, 4), ("vit_b", 1024, 2)]


def measure(quick: bool) -> dict:
    """Every config: step times side by side in this process, peak RSS per variant in fresh subprocesses
    (full run only). value = the no-masking / default-variant step-time ratio of the largest encoder measured."""
    set_threads()
    detail: dict = {"mask_ratio": MASK_RATIO}
    value = None
    for arch, size, steps in configs(quick):
        result = timing(arch, size, steps)
        gc.collect()
        step_s = result["step_s"]
        value = step_s["none"] / step_s[DEFAULT_VARIANT]
        result = {"speedup_drop": round(step_s["none"] / step_s["drop"], 3),
                  "speedup_patch_drop": round(step_s["none"] / step_s["patch_drop"], 3),
                  "speedup_mask_token": round(step_s["none"] / step_s["mask_token"], 3), **result}
        if not quick:
            result["memory"] = {v: run_json_subprocess("bench_mae.py", "--memory", arch, str(size), v)
                                for v in VARIANTS}
        detail[f"{arch}_{size}"] = result
    detail["value_from"] = "_".join(map(str, configs(quick)[-1][:2]))
    gc.collect()
    detail["simmim"] = simmim_timing(quick)
    return entry(value, ">= 2.5", detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory", nargs=3, metavar=("ARCH", "SIZE", "VARIANT"))
    args = parser.parse_args()
    if args.memory:
        arch, size, variant = args.memory
        print_json(memory_one(arch, int(size), variant))
    else:
        print_json({"mae_speedup": measure(args.quick)})


if __name__ == "__main__":
    main()
