"""Slice loader throughput from the slice cache vs the tiny model's training consumption (JSON on stdout).

    python bench/bench_loader.py [--quick] [--data demo:brain] [--seconds 10] [--sizes 256 1024]

Measures items/s of the fine-tune stage's ``SliceDataset`` (slice cache already built, augmentation on)
through a DataLoader with 0 and 2 workers (batch 4), and images/s of the vit_tiny fine-tune step
(encoder=lora decoder=full prompt=none, batch 4: forward, loss, backward, AdamW) before and after the
loader runs. ``loader_headroom`` = loader items/s with 2 workers ÷ training images/s: above 1 the loader
outpaces the model (measured one after the other: in training both share the cores).

``by_size`` (each of ``--sizes``; full run: 256 and 1024 px): 2-worker slices/s with the per-slice CPU
augmentation and without any (what the loader does when ``samadapt.data.device_augment`` augments the
batch on the compute device), and that batched augmentation's ms per batch on this CPU. At 1024 px the
headroom is taken against the on-paper A100 rate of ViT-B 1024 LoRA training (``bench_flops``, results.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import BENCH_DIR, entry, median, print_json, set_threads, step_times
from torch.utils.data import DataLoader, default_collate

BATCH = 4


def loader_rate(dataset, workers: int, seconds: float) -> float:
    """Items/s of a shuffled DataLoader over ``dataset`` (worker start-up excluded)."""
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    items, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        items += len(batch["image"])
    return items / (time.perf_counter() - start)


def training_rate(model, dataset, loss, steps: int) -> float:
    """Images/s of bare fine-tune steps on one batch of ``dataset``."""
    batch = default_collate([dataset[i] for i in range(BATCH)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        value, _ = loss(model, batch)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return BATCH / median(step_times(step, steps, warmup=1))


def device_augment_ms(config, dataset, repeats: int) -> float:
    """Median ms of ``device_augment.augment_batch`` on one batch of ``dataset`` (on this CPU)."""
    from samadapt.data.device_augment import BatchParameters, augment_batch, batch_generator

    batch = default_collate([dataset[i] for i in range(BATCH)])
    times = step_times(lambda: augment_batch(BatchParameters.draw(config, BATCH, batch_generator(0)),
                                             batch["image"], batch["label"]), repeats, warmup=1)
    return 1000 * median(times)


def a100_estimate() -> float | None:
    """bench_flops' on-paper A100 images/s of ViT-B 1024 LoRA training, from the last full results.json."""
    try:
        return json.loads((BENCH_DIR / "results.json").read_text(encoding="utf-8"))[
            "gpu_estimate_a100_images_per_s"]["value"]
    except (OSError, KeyError, ValueError):
        return None


def by_size(dataset, augment, sizes: list[int], seconds: float, model_rate: float) -> dict:
    """Per image size: 2-worker slices/s with CPU augmentation and without (the on-device path), the
    device augmentation's ms per batch, and headroom against the model that would consume them."""
    from samadapt.data import SliceDataset

    cases = [e[0] for e in dataset.entries]
    results = {}
    for size in sizes:
        prep = replace(dataset.prep, image_size=size)
        augmented = SliceDataset(cases, prep, labeled=True, augment=augment)
        plain = SliceDataset(cases, prep, labeled=True)
        consumer = model_rate if size == dataset.prep.image_size else a100_estimate()
        # Timed before the loaders: their workers linger until collected and would share the cores.
        augment_ms = device_augment_ms(augment, plain, 5)
        row = {"device_augment_ms_per_batch_cpu": round(augment_ms, 2),
               "slices_per_s_2_workers_cpu_augment": round(loader_rate(augmented, 2, seconds), 1),
               "slices_per_s_2_workers_no_augment": round(loader_rate(plain, 2, seconds), 1),
               "consumer": "vit_tiny train images/s (this CPU)" if consumer == model_rate
               else "ViT-B 1024 LoRA train images/s on an A100 (bench_flops estimate)",
               "consumer_images_per_s": None if consumer is None else round(consumer, 2)}
        if consumer:
            row["headroom_cpu_augment"] = round(row["slices_per_s_2_workers_cpu_augment"] / consumer, 2)
            row["headroom_device_augment"] = round(row["slices_per_s_2_workers_no_augment"] / consumer, 2)
        results[str(size)] = row
    return results


def measure(quick: bool, data: str = "demo:brain", seconds: float | None = None,
            sizes: list[int] | None = None) -> dict:
    from bench_overhead import finetune_setup

    from samadapt.data import SliceDataset

    seconds = seconds or (2.0 if quick else 10.0)
    steps = 3 if quick else 10
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        config, model, dataset, _, _, loss, _ = finetune_setup(Path(tmp), augment="cpu")
    if data != config.data:
        from samadapt.data.manifest import load_manifest, resolve_manifest
        from samadapt.keys import preprocessing

        dataset = SliceDataset(load_manifest(resolve_manifest(data), split="train"), preprocessing(config),
                               labeled=True, augment=config.augment)
    plain = SliceDataset([e[0] for e in dataset.entries], dataset.prep, labeled=True)
    before = training_rate(model, dataset, loss, steps)
    rates = {"slices_per_s_0_workers_no_augment": loader_rate(plain, 0, seconds),
             "slices_per_s_0_workers": loader_rate(dataset, 0, seconds),
             "slices_per_s_2_workers": loader_rate(dataset, 2, seconds)}
    after = training_rate(model, dataset, loss, steps)
    model_rate = (before + after) / 2
    detail = {"data": data, "slices": len(dataset), "batch": BATCH, "augmentation": True,
              **{k: round(v, 1) for k, v in rates.items()},
              "vit_tiny_train_images_per_s": round(model_rate, 2),
              "train_images_per_s_before_after": [round(before, 2), round(after, 2)],
              "by_size": by_size(dataset, config.augment, sizes or ([256] if quick else [256, 1024]), seconds,
                                 model_rate)}
    return entry(rates["slices_per_s_2_workers"] / model_rate, ">= 3", detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default="demo:brain")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes for by_size")
    args = parser.parse_args()
    set_threads()
    print_json({"loader_headroom": measure(args.quick, args.data, args.seconds, args.sizes)})


if __name__ == "__main__":
    main()
