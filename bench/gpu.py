"""Throughput of samadapt's models on a GPU: one prepared script for a GPU machine (JSON on stdout).

    python3 bench/gpu.py [--out bench/gpu_results.json]   # on the GPU machine (a few minutes on an H200)
    python3 bench/gpu.py --cpu-smoke [--out FILE]          # every code path at tiny sizes on the CPU

Measured in bf16 autocast on synthetic slices (nothing is read from disk), each with the peak GPU memory
(``torch.cuda.max_memory_allocated``) and FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` over
one untimed step of the same model, hence model FLOP utilisation (MFU) against the GPU's dense bf16 peak:

- ``finetune``: ViT-B 1024 px, encoder=lora decoder=full prompt=none (the fine-tune stage's model and its
  DiceCE loss, AdamW over ``param_groups``, gradient clipping at ``max_grad_norm``), images/s with and
  without grad checkpointing; MFU also against the per-image FLOPs of ``bench_flops.py`` stored in
  ``bench/results.json`` (``gpu_estimate_a100_images_per_s``).
- ``mae``: MAE pretraining of the ViT-B 1024 encoder under the pretrain stage's defaults (``drop`` at mask
  0.75) vs ``none`` (bench_mae's full grid, mask ratio 0), images/s.
- ``litemedsam_encoder``: LiteMedSAM's TinyViT with its 1 x 1 stem (``arch=vit_t_lite``, 256 px) through
  ``SamSegmenter.embed``, slices/s in bf16 and fp32.
- ``predict``: the automatic-mode inference of ``predict``/``evaluate`` (``model(slices)``, argmax labels as
  uint8 on the host), slices/s for vit_b 1024 and vit_t_lite 256, in bf16 and fp32 (torch's defaults).

Inference runs under ``torch.no_grad`` as ``predict_slices`` does (``inference_mode`` + bf16 autocast +
FlopCounterMode fails in SAM's rel-pos einsum, torch 2.14). Without CUDA the script prints
``{"status": "no GPU"}`` and exits 0 (unless ``--cpu-smoke``). A measurement that fails gets its error in the
JSON and the exit code is 1. The GPU machine has no samadapt install and no registry: bench/README.md says
which wheels ``bench/prepare_gpu_wheels.sh`` puts in ``bench/gpu_wheels/`` and the one command to run there.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from common import BENCH_DIR, GIB, machine
from torch.utils.flop_counter import FlopCounterMode

REPO = BENCH_DIR.parent
# NVIDIA H200 datasheet: 1,979 TFLOPS BF16 Tensor Core "with sparsity", i.e. 989 dense (the H100 SXM figure:
# same GH100 chip and clocks, more memory).
H200_PEAK_BF16_TFLOPS = 989.0
DEFAULT_OUT = BENCH_DIR / "gpu_results.json"

# (arch, image size) and batch per measurement; steps = (warm-up, timed). The GPU sizes keep the whole run
# within a few minutes on an H200; the smoke sizes only prove every code path runs, in ~25 s of CPU.
GPU_SIZES = {"train": ("vit_b", 1024), "mae": ("vit_b", 1024), "lite": ("vit_t_lite", 256), "train_batch": 8,
             "mae_batch": 8, "encoder_batch": 64, "predict_batch": 8, "steps": (3, 20)}
# MAE: vit_tiny at 256 px, the smallest size at which mask 0.75 leaves a window (4 windows of 8 x 8 tokens);
# vit_t (MobileSAM: stride-4 stem, any size) at 64 px stands in for vit_t_lite (~5 s per call on a CPU core).
SMOKE_SIZES = {"train": ("vit_tiny", 64), "mae": ("vit_tiny", 256), "lite": ("vit_t", 64), "train_batch": 1,
               "mae_batch": 1, "encoder_batch": 1, "predict_batch": 1, "steps": (0, 1)}


def use_checkout() -> None:
    """Make ``samadapt`` importable from this checkout when it is not installed (the GPU machine gets the
    working tree only): the repository root on ``sys.path``, and the stage folders (``pretrain/``,
    ``finetune/``, ...) found as ``samadapt.<folder>`` — pyproject's ``package-dir`` maps each to the
    subpackage of the same name."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # after site-packages: an installed samadapt wins
    import samadapt

    if str(REPO) not in samadapt.__path__:
        samadapt.__path__.append(str(REPO))


class Device:
    """Where the measurements run: synchronisation, autocast, peak memory and peak FLOP/s, CUDA or the CPU.

    ``smoke``: the CPU stands in for a GPU; MFU is then computed against the H200 figure only so that its
    arithmetic runs (the number means nothing)."""

    def __init__(self, name: str, smoke: bool = False) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        self.smoke = smoke

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self, bf16: bool):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / GIB, 3) if self.cuda else None

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.cuda else "cpu"

    def peak_tflops(self) -> tuple[float | None, str]:
        """Dense bf16 peak of this GPU and where the figure comes from (None: a GPU with no known peak)."""
        from bench_flops import PEAK_BF16_TFLOPS

        if self.smoke:
            return H200_PEAK_BF16_TFLOPS, "cpu smoke: the H200 figure, to run the MFU code only"
        if "H200" in self.name():
            return H200_PEAK_BF16_TFLOPS, "H200_PEAK_BF16_TFLOPS (NVIDIA datasheet, dense)"
        for gpu, peak in PEAK_BF16_TFLOPS.items():
            if gpu.split()[0] in self.name():
                return peak, f"bench_flops.PEAK_BF16_TFLOPS[{gpu!r}]"
        return None, f"no peak known for {self.name()}"


def timed(device: Device, step: Callable[[], Any], steps: tuple[int, int], items: int) -> dict[str, float]:
    """Run ``step`` warm-up + timed times; items/s over the timed ones (the GPU synchronised at both ends).
    :func:`measure` has already called it once (counting FLOPs), so warm-up may be 0."""
    warmup, count = steps
    for _ in range(warmup):
        step()
    device.sync()
    start = time.perf_counter()
    for _ in range(count):
        step()
    device.sync()
    seconds = time.perf_counter() - start
    return {"per_s": round(items * count / seconds, 2), "step_ms": round(1000 * seconds / count, 2)}


def counted_gflop(step: Callable[[], Any]) -> float:
    """GFLOPs of one call of ``step`` (FlopCounterMode: matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def measure(device: Device, step: Callable[[], Any], steps: tuple[int, int], items: int) -> dict[str, Any]:
    """items/s, step time, peak memory, GFLOP per item and MFU of ``step`` (which handles ``items`` items)."""
    gflop = counted_gflop(step)  # also the first warm-up call
    device.reset_peak()
    result = timed(device, step, steps, items)
    peak, _ = device.peak_tflops()
    achieved = gflop * 1e9 * result["per_s"] / items
    return {**result, "peak_memory_gib": device.peak_gib(), "gflop_per_item": round(gflop / items, 1),
            "achieved_tflops": round(achieved / 1e12, 2),
            "mfu": None if peak is None else round(achieved / (peak * 1e12), 4)}


def synthetic(device: Device, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices B x 1 x S x S in [0, 1] and binary labels B x S x S (a centred disc), on the device."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).long()
    return images.to(device.device), disc.expand(batch, -1, -1).contiguous().to(device.device)


def finetune_config(arch: str, size: int, grad_checkpointing: bool):
    """The fine-tune stage's config for this model (its LoRA / adapter / optimiser defaults)."""
    from samadapt.finetune.config import FinetuneConfig

    with tempfile.TemporaryDirectory() as tmp:
        return FinetuneConfig(data="demo:brain", out=Path(tmp), num_classes=2, arch=arch, image_size=size,
                              encoder="lora", decoder="full", prompt="none", grad_checkpointing=grad_checkpointing)


def build_segmenter(config, device: Device):
    """``samadapt.finetune.stage.build_model`` for checkpoint=none, built here because that module imports
    the data layer (SimpleITK), which the GPU machine does not have."""
    from samadapt.models.checkpoints import load_sam
    from samadapt.models.segmenter import SamSegmenter
    from samadapt.models.strategies import apply_strategy

    torch.manual_seed(config.seed)
    sam = load_sam(config.arch, None, image_size=config.image_size)
    segmenter = SamSegmenter(sam, config.num_classes, config.prompt, config.grad_checkpointing)
    return apply_strategy(segmenter, config.encoder, config.decoder, config.lora, config.adapter).to(device.device)


def bench_flops_reference() -> dict[str, Any]:
    """Per-image step GFLOPs of ViT-B 1024 LoRA fine-tuning as ``bench_flops.py`` counted them (results.json)."""
    path = BENCH_DIR / "results.json"
    try:
        detail = json.loads(path.read_text(encoding="utf-8"))["gpu_estimate_a100_images_per_s"]["detail"]
        return {"model": detail["model"], "step_gflop": detail["flops"]["step_gflop"],
                "step_gflop_grad_checkpointing": detail["flops_grad_checkpointing"]["step_gflop"]}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return {"error": f"{path.name}: {type(exc).__name__}: {exc}"}


def finetune_throughput(device: Device, sizes: dict) -> dict[str, Any]:
    """Training images/s of the fine-tune stage's step, with and without grad checkpointing."""
    arch, size = sizes["train"]
    reference = bench_flops_reference()
    result: dict[str, Any] = {"model": f"{arch} {size} encoder=lora decoder=full prompt=none",
                              "batch": sizes["train_batch"], "bench_flops": reference}
    for checkpointing in (False, True):
        measured = finetune_one(device, sizes, finetune_config(arch, size, checkpointing))
        peak, _ = device.peak_tflops()
        key = "step_gflop_grad_checkpointing" if checkpointing else "step_gflop"
        if peak is not None and key in reference:  # bench_flops counted vit_b 1024: the GPU sizes
            measured["mfu_vs_bench_flops"] = round(reference[key] * 1e9 * measured["per_s"] / (peak * 1e12), 4)
        result["grad_checkpointing_on" if checkpointing else "grad_checkpointing_off"] = measured
    return result


def finetune_one(device: Device, sizes: dict, config) -> dict[str, Any]:
    """:func:`measure` of one fine-tune training step (the model is freed on return)."""
    from samadapt.training import param_groups

    images, labels = synthetic(device, sizes["train_batch"], config.image_size)
    model = build_segmenter(config, device).train()
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with device.autocast(bf16=True):  # accelerate's mixed_precision=bf16: autocast over forward + loss
            loss = model.loss_fn(model(images, None), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(device, step, sizes["steps"], sizes["train_batch"])


def mae_throughput(device: Device, sizes: dict) -> dict[str, Any]:
    """MAE pretraining images/s of the encoder under the pretrain stage's defaults (variant, mask ratio,
    decoder, optimiser, clipping) vs the same without masking (bench_mae's ``none``: full grid, ratio 0)."""
    from samadapt.pretrain.config import PretrainConfig

    arch, size = sizes["mae"]
    with tempfile.TemporaryDirectory() as tmp:
        config = PretrainConfig(data="demo:ssl", out=Path(tmp), arch=arch, image_size=size)
    result: dict[str, Any] = {"model": f"{arch} {size} MAE (decoder {config.decoder_dim} wide, "
                              f"{config.decoder_depth} blocks)", "batch": sizes["mae_batch"],
                              "mask_ratio": config.mask_ratio}
    for variant in ("none", config.variant):
        result[variant] = mae_one(device, sizes, config, variant)
    result[f"speedup_{config.variant}"] = round(result[config.variant]["per_s"] / result["none"]["per_s"], 3)
    return result


def mae_one(device: Device, sizes: dict, config, variant: str) -> dict[str, Any]:
    """:func:`measure` of one MAE training step of ``variant`` (``none``: mask_token at ratio 0)."""
    from samadapt.models.normalisation import to_sam_input
    from samadapt.models.registry import build_sam
    from samadapt.pretrain.mae import MaskedAutoencoderSAM
    from samadapt.training import param_groups

    images, _ = synthetic(device, sizes["mae_batch"], config.image_size)
    torch.manual_seed(config.seed)
    model = MaskedAutoencoderSAM(build_sam(config.arch, image_size=config.image_size).image_encoder,
                                 mask_ratio=0.0 if variant == "none" else config.mask_ratio,
                                 decoder_dim=config.decoder_dim, decoder_depth=config.decoder_depth,
                                 variant="mask_token" if variant == "none" else variant,
                                 norm_pix_loss=config.norm_pix_loss).to(device.device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with device.autocast(bf16=True):  # the pretrain stage's masked_image_loss
            loss = model(to_sam_input(images)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(device, step, sizes["steps"], sizes["mae_batch"])


def inference_model(arch: str, size: int, device: Device):
    """The automatic-mode segmenter of ``arch`` as predict runs it (LoRA + full decoder for vit_b, as
    bench_evaluate), in eval mode."""
    return build_segmenter(finetune_config(arch, size, False), device).eval()


def litemedsam_encoder(device: Device, sizes: dict) -> dict[str, Any]:
    """Slices/s of LiteMedSAM's image encoder (min/max input normalisation included), bf16 and fp32."""
    arch, size = sizes["lite"]
    model = inference_model(arch, size, device)
    images, _ = synthetic(device, sizes["encoder_batch"], size)
    result: dict[str, Any] = {"arch": arch, "image_size": size, "batch": sizes["encoder_batch"]}
    for precision in ("bf16", "fp32"):
        def step() -> None:
            with torch.no_grad(), device.autocast(bf16=precision == "bf16"):
                model.embed(images)

        result[precision] = measure(device, step, sizes["steps"], sizes["encoder_batch"])
    return result


def predict_throughput(device: Device, sizes: dict) -> dict[str, Any]:
    """Slices/s of automatic-mode prediction (``samadapt.inference.predict_slices``' loop body: the model,
    ``predict_labels``, uint8 labels copied to the host) for vit_b and vit_t_lite, bf16 and fp32.
    predict_slices itself is not called: samadapt.inference imports the data layer (SimpleITK)."""
    result: dict[str, Any] = {"batch": sizes["predict_batch"]}
    for arch, size in (sizes["train"], sizes["lite"]):
        model = inference_model(arch, size, device)
        images, _ = synthetic(device, sizes["predict_batch"], size)
        for precision in ("bf16", "fp32"):
            result[f"{arch}_{size}_{precision}"] = measure(
                device, predict_step(model, images, device, precision == "bf16"), sizes["steps"], len(images))
    return result


def predict_step(model, images: torch.Tensor, device: Device, bf16: bool) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad(), device.autocast(bf16):  # as predict_slices (inference_mode: see module doc)
            model.predict_labels(model(images, None)).to(torch.uint8).cpu()
    return step


MEASUREMENTS: dict[str, Callable[[Device, dict], dict[str, Any]]] = {
    "finetune": finetune_throughput,
    "mae": mae_throughput,
    "litemedsam_encoder": litemedsam_encoder,
    "predict": predict_throughput,
}


def run(device: Device, sizes: dict) -> tuple[dict[str, Any], bool]:
    """Every measurement in turn; one that fails records its error and the others still run."""
    peak, source = device.peak_tflops()
    results: dict[str, Any] = {
        "machine": {**machine(), "device": device.name(),
                    "peak_bf16_tflops": peak, "peak_source": source}}
    ok, started = True, time.perf_counter()
    for name, function in MEASUREMENTS.items():
        tick = time.perf_counter()
        try:
            results[name] = function(device, sizes)
        except Exception as exc:  # one broken measurement must not hide the others' numbers
            ok = False
            print(traceback.format_exc(), file=sys.stderr)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["bench_seconds"] = round(time.perf_counter() - tick, 1)
        device.reset_peak()
        print(f"[gpu] {name}: {time.perf_counter() - tick:.0f} s", file=sys.stderr)
    results["machine"]["total_seconds"] = round(time.perf_counter() - started, 1)
    return results, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, 1 warm-up + 1 timed step")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file to write (default {DEFAULT_OUT.relative_to(REPO)} on a GPU; none in smoke)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(json.dumps({"status": "no GPU", "detail": "torch.cuda.is_available() is False: nothing measured"}))
        return
    use_checkout()
    device = Device("cpu", smoke=True) if args.cpu_smoke else Device("cuda")
    results, ok = run(device, SMOKE_SIZES if args.cpu_smoke else GPU_SIZES)
    results["status"] = "cpu smoke" if args.cpu_smoke else "measured"
    text = json.dumps(results, indent=2)
    print(text)
    out = args.out or (None if args.cpu_smoke else DEFAULT_OUT)
    if out is not None:
        from samadapt.io import write_text

        write_text(out, text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
