"""Slice loader throughput from the slice cache vs the tiny model's training consumption (JSON on stdout).

    python bench/bench_loader.py [--quick] [--data demo:brain] [--seconds 10]

Measures items/s of the fine-tune stage's ``SliceDataset`` (slice cache already built, augmentation on)
through a DataLoader with 0 and 2 workers (batch 4), and images/s of the vit_tiny fine-tune step
(encoder=lora decoder=full prompt=none, batch 4: forward, loss, backward, AdamW) before and after the
loader runs. ``loader_headroom`` = loader items/s with 2 workers ÷ training images/s: above 1 the loader
outpaces the model (measured one after the other: in training both share the cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import entry, median, print_json, set_threads, step_times
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


def measure(quick: bool, data: str = "demo:brain", seconds: float | None = None) -> dict:
    from bench_overhead import finetune_setup

    from samadapt.data import SliceDataset

    seconds = seconds or (2.0 if quick else 10.0)
    steps = 3 if quick else 10
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        config, model, dataset, _, loss, _ = finetune_setup(Path(tmp))
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
              "train_images_per_s_before_after": [round(before, 2), round(after, 2)]}
    return entry(rates["slices_per_s_2_workers"] / model_rate, ">= 3", detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default="demo:brain")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    set_threads()
    print_json({"loader_headroom": measure(args.quick, args.data, args.seconds)})


if __name__ == "__main__":
    main()
