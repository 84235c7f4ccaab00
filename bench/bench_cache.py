"""Decoder-only fine-tuning (encoder=frozen) epoch time without vs with the embedding cache (JSON on stdout).

    python bench/bench_cache.py [--quick]

Both runs go through :meth:`samadapt.training.Trainer.fit` with the stage's model (``build_model``,
encoder=frozen decoder=full prompt=none, batch 4) and loss (``make_loss_fn``), on the first N training slices
of ``demo:brain`` without augmentation (``embedding_views=0``, so both see the same images; the slices are cut
to N before the cache is built, hence not the stage's ``training_data``): *without* the
cache every step runs the frozen image encoder; *with* it, :class:`EmbeddingDataset` (built into a fresh
temporary folder, build time reported) feeds cached float16 embeddings to the decoder. Each run trains
two epochs; the second epoch's wall time is compared (the first one holds start-up).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import entry, print_json, set_threads

BATCH = 4


def measure(quick: bool) -> dict:
    from samadapt.data import SliceDataset
    from samadapt.data.manifest import load_manifest, resolve_manifest
    from samadapt.finetune.config import FinetuneConfig
    from samadapt.finetune.embeddings import EmbeddingDataset
    from samadapt.finetune.stage import build_model, make_loss_fn
    from samadapt.keys import preprocessing
    from samadapt.training import Trainer, make_accelerator

    arch, count = ("vit_tiny", 16) if quick else ("vit_b", 48)
    epoch_steps = count // BATCH
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        config = FinetuneConfig(data="demo:brain", out=Path(tmp) / "out", num_classes=2, arch=arch, image_size=256,
                                encoder="frozen", decoder="full", prompt="none", batch_size=BATCH, val_split=None,
                                steps=2 * epoch_steps, log_every=epoch_steps, save_every=10**9, resume=False)
        accelerator = make_accelerator(config)
        cases = load_manifest(resolve_manifest(config.data), split=config.split, require_labels=True)
        slices = SliceDataset(cases, preprocessing(config), cache_dir=config.cache_dir, labeled=True,
                              num_classes=2, skip_empty=config.skip_empty, empty_fraction=config.empty_fraction)
        slices.items = slices.items[:count]  # a fixed subset keeps the benchmark short; same for both runs

        def second_epoch_seconds(cached: bool) -> tuple[float, float]:
            """(second-epoch seconds, cache build seconds) of one two-epoch fit."""
            model = build_model(config)
            build = 0.0
            dataset = slices
            if cached:
                start = time.perf_counter()
                dataset = EmbeddingDataset(slices, model, Path(tmp) / "cache", 0, None, config.seed,
                                           config.eval_batch_size, accelerator.device)
                build = time.perf_counter() - start
            marks = []
            Trainer(accelerator, config, Path(tmp) / f"run_{cached}").fit(
                model, dataset, make_loss_fn(config, model, use_embeddings=cached),
                after_step=lambda step, prepared: marks.append(time.perf_counter()), desc=f"cache={cached}")
            return marks[2 * epoch_steps - 1] - marks[epoch_steps - 1], build

        without, _ = second_epoch_seconds(False)
        with_cache, build = second_epoch_seconds(True)
    detail = {"arch": f"{arch} 256", "slices": count, "batch": BATCH, "steps_per_epoch": epoch_steps,
              "epoch_s_without_cache": round(without, 2), "epoch_s_with_cache": round(with_cache, 3),
              "cache_build_s": round(build, 2),
              "break_even_epochs": round(build / max(without - with_cache, 1e-9), 2)}
    return entry(without / with_cache, ">= 10", detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    print_json({"embedding_cache_speedup": measure(args.quick)})


if __name__ == "__main__":
    main()
