"""Slice loader throughput from the slice cache vs the tiny model's training consumption (JSON on stdout).

    python bench/bench_loader.py [--data demo:brain] [--image-size 256] [--batch-size 8] [--seconds 10]

Measures items/s of ``SliceDataset`` (cache already built, augmentation on) through a DataLoader with 0
and 2 workers, and images/s of one vit_tiny training step (encoder + no-prompt decoder, forward +
backward). ``ratio`` > 1 means the loader outpaces the model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from samadapt.data import AugmentConfig, Preprocessing, SliceDataset, to_sam_input
from samadapt.data.manifest import load_manifest, resolve_manifest


def loader_rate(dataset: SliceDataset, workers: int, batch_size: int, seconds: float) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    items, start, iterator = 0, None, iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        items += len(batch["image"])
    return items / (time.perf_counter() - start)


def model_rate(image_size: int, batch_size: int, steps: int = 5) -> float:
    from samadapt.models.registry import build_sam

    sam = build_sam("vit_tiny", image_size=image_size)
    optimizer = torch.optim.AdamW(sam.parameters(), lr=1e-4)
    images = to_sam_input(torch.rand(batch_size, 1, image_size, image_size))
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)

    def step() -> None:
        embeddings = sam.image_encoder(images)
        loss = 0.0
        for embedding in embeddings:  # the decoder takes one image at a time
            masks, _ = sam.mask_decoder(embedding[None], sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            loss = loss + masks.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo:brain")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = load_manifest(resolve_manifest(args.data), split="train")
    prep = Preprocessing(image_size=args.image_size)
    start = time.perf_counter()
    dataset = SliceDataset(cases, prep, cache_dir=args.cache_dir, augment=AugmentConfig())
    build_s = time.perf_counter() - start
    plain = SliceDataset(cases, prep, cache_dir=args.cache_dir)
    result = {
        "data": args.data, "volumes": len(cases), "slices": len(dataset), "image_size": args.image_size,
        "cache_build_or_open_s": round(build_s, 2),
        "slices_per_s_0_workers_no_augment": round(loader_rate(plain, 0, args.batch_size, args.seconds), 1),
        "slices_per_s_0_workers": round(loader_rate(dataset, 0, args.batch_size, args.seconds), 1),
        "slices_per_s_2_workers": round(loader_rate(dataset, 2, args.batch_size, args.seconds), 1),
    }
    result["vit_tiny_train_images_per_s"] = round(model_rate(args.image_size, 2), 1)
    result["ratio_loader_2_workers_vs_model"] = round(
        result["slices_per_s_2_workers"] / result["vit_tiny_train_images_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
