"""Overhead of samadapt's training loop over a bare PyTorch loop, finetune and pretrain stage (JSON on stdout).

    python bench/bench_overhead.py [--quick] [--stage finetune|pretrain|both]

The *stage loop* is :meth:`samadapt.training.Trainer.fit` exactly as the stage calls it: the stage's model
(finetune: ``build_model``, vit_tiny 256, encoder=lora decoder=full prompt=none; pretrain:
``MaskedAutoencoderSAM``, the default variant, mask 0.75), its dataset (slice cache, weighted sampler), its
parameter groups and loss (with the default augmentation: batched, on the device), ``max_grad_norm`` and
logging at their defaults, batch 4. Its
step time comes from the ``images_per_s`` the Trainer logs per window of ``log_every`` steps (the first
window, with the DataLoader start-up, is dropped); checkpoints are off (``save_every`` huge), no hooks.

The *bare loop* is forward → loss → backward → AdamW step → zero_grad on the same model object, the same
parameter groups and one fixed batch of the same dataset (already in memory), not augmented: what the stage
spends on augmentation is part of its overhead.

Both alternate in rounds in this process, so a load change on the machine hits both; the ratio is the
median stage step time over the median bare step time. ``detail`` also splits the stage's extra time into
its parts (data loading, gradient clipping) measured the same way.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import entry, median, print_json, set_threads, step_times
from torch.utils.data import default_collate

from samadapt.pretrain.config import DEFAULT_VARIANT

BATCH = 4


def finetune_setup(out: Path, augment: str = "device"):
    """(config, model, dataset, sample_weights, stage loss_fn, bare loss_fn, groups) as ``samadapt finetune``
    builds them: its ``build_model``, ``labeled_slices`` and ``make_loss_fn`` (groups None: the Trainer's
    default). ``augment``: device (the default, ``augment.on_device``: the stage's loss augments each batch),
    cpu (per slice with MONAI in the DataLoader) or none. The bare loop's loss never augments: what the stage
    spends on augmentation counts as its overhead."""
    from samadapt.data.manifest import load_manifest, resolve_manifest
    from samadapt.finetune.config import FinetuneConfig
    from samadapt.finetune.stage import build_model, make_loss_fn
    from samadapt.supervised import labeled_slices

    config = FinetuneConfig(data="demo:brain", out=out, num_classes=2, arch="vit_tiny", image_size=256,
                            encoder="lora", decoder="full", prompt="none", batch_size=BATCH, val_split=None,
                            save_every=10**9, resume=False)
    config = replace(config, augment=replace(config.augment, on_device=augment == "device"))
    cases = load_manifest(resolve_manifest(config.data), split=config.split, require_labels=True)
    model = build_model(config)
    slices = labeled_slices(config, cases, augment=augment != "none")
    plain = replace(config, augment=replace(config.augment, on_device=False))
    stage_loss = make_loss_fn(config if augment != "none" else plain, model, use_embeddings=False)
    return config, model, slices, slices.sample_weights(), stage_loss, make_loss_fn(plain, model, False), None


def pretrain_setup(out: Path, augment: str = "device"):
    """The same for ``samadapt pretrain`` (its ``build_dataset``, ``build_model``: MAE around vit_tiny's encoder,
    ``make_loss_fn``; the bare loop: ``masked_image_loss``, unaugmented) with the stage's layer-wise lr groups."""
    from samadapt.pretrain.config import PretrainConfig
    from samadapt.pretrain.stage import build_dataset, build_model, make_loss_fn, masked_image_loss
    from samadapt.training import layer_lr_scale, param_groups

    config = PretrainConfig(data="demo:ssl", out=out, arch="vit_tiny", image_size=256, batch_size=BATCH,
                            save_every=10**9, resume=False, preview_every=0)
    config = replace(config, augment=replace(config.augment, on_device=augment != "cpu"))
    dataset = build_dataset(config)  # on_device: the slices as cached, unaugmented
    _, model = build_model(config)
    groups = param_groups(model, config.weight_decay, layer_lr_scale(model, config.layer_decay))
    stage_loss = masked_image_loss if augment == "none" else make_loss_fn(config)
    return config, model, dataset, None, stage_loss, masked_image_loss, groups


def interleaved(stage: str, steps: int, num_workers: int, tmp: Path, augment: str = "device") -> dict:
    """One ``Trainer.fit`` of the stage; after every stage step one bare step runs (timed) in the hook.

    The stage step time is the time between two hook calls (everything the loop does per step: fetching
    and augmenting the batch, lr update, seeding, forward, backward, clipping, optimiser, logging); the
    Trainer itself excludes hook time from its own ``images_per_s``, also reported. Alternating single
    steps makes load changes on the shared machine hit both loops alike."""
    from samadapt.training import Trainer, make_accelerator, param_groups

    setup = finetune_setup if stage == "finetune" else pretrain_setup
    config, model, dataset, weights, loss, bare_loss, groups = setup(tmp / "init", augment)
    config.steps, config.log_every, config.num_workers = steps, max(1, steps // 4), num_workers
    accelerator = make_accelerator(config)  # also sets the thread count like the stage
    model = model.to(accelerator.device)
    batch = default_collate([dataset[i] for i in range(BATCH)])
    bare_groups = groups if groups is not None else param_groups(model, config.weight_decay)
    bare_params = [p for g in bare_groups for p in g["params"]]
    optimizer = torch.optim.AdamW(bare_groups, lr=config.lr)
    times: dict[str, list[float]] = {"stage": [], "bare": [], "clip": []}
    last_end = None

    def bare_step() -> None:
        start = time.perf_counter()
        value, _ = bare_loss(model, batch)
        value.backward()
        clip_start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(bare_params, config.max_grad_norm or float("inf"))
        clip_end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["bare"].append(time.perf_counter() - start - (clip_end - clip_start))
        times["clip"].append(clip_end - clip_start)

    def after_step(step, prepared) -> bool:
        nonlocal last_end
        now = time.perf_counter()
        if last_end is not None:
            times["stage"].append(now - last_end)
        model.train()
        bare_step()
        last_end = time.perf_counter()
        return False

    trainer = Trainer(accelerator, config, tmp / f"{stage}_{num_workers}_{augment}")
    result = trainer.fit(model, dataset, loss, groups=groups, sample_weights=weights, after_step=after_step,
                         desc=stage)
    warm = 2  # first steps: allocator and DataLoader start-up
    stage_times, bare_times = times["stage"][warm:], times["bare"][warm + 1:]
    logged = [BATCH / float(row["images_per_s"]) for row in result.history[1:]]
    return {"ratio": median(stage_times) / median(bare_times),
            "paired_ratio": median([s / b for s, b in zip(stage_times, bare_times)]),
            "stage_step_ms": round(1000 * median(stage_times), 1), "bare_step_ms": round(1000 * median(bare_times), 1),
            "clip_grad_norm_ms": round(1000 * median(times["clip"]), 1),
            "trainer_logged_step_ms": round(1000 * median(logged), 1) if logged else None,
            "steps_timed": len(stage_times), "dataset": dataset}


def batch_loading_ms(dataset, count: int) -> float:
    """Median ms to fetch one batch in the main process (what num_workers=0 adds to every step)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    iterator = iter(loader)
    return 1000 * median(step_times(lambda: next(iterator), min(count, len(loader) - 1), warmup=1))


def measure(stage: str, quick: bool) -> dict:
    """The stage loop vs the bare loop (interleaved), at the stage's defaults (num_workers=0, finetune with
    on-device augmentation) and, in the full run, with one DataLoader worker, with the per-slice MONAI
    augmentation and without any; returns a result entry (value: the defaults)."""
    steps = 8 if quick else 40

    def rounded(result: dict) -> dict:
        result.pop("dataset")
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}

    with tempfile.TemporaryDirectory(prefix=f"bench_{stage}_") as tmp:
        default = interleaved(stage, steps, 0, Path(tmp))
        dataset = default["dataset"]
        detail = {
            "model": "vit_tiny 256 " + ("encoder=lora decoder=full prompt=none" if stage == "finetune"
                                        else f"MAE variant={DEFAULT_VARIANT} mask_ratio=0.75"),
            "batch": BATCH, "augmentation": "on the device (augment.on_device=true)", "num_workers": 0,
            **rounded(default),
            "batch_loading_ms": round(batch_loading_ms(dataset, 5 if quick else 20), 1),
        }
        if not quick:
            detail["with_1_worker"] = rounded(interleaved(stage, steps, 1, Path(tmp)))
            detail["cpu_augmentation"] = rounded(interleaved(stage, steps, 0, Path(tmp), augment="cpu"))
            detail["without_augmentation"] = rounded(interleaved(stage, steps, 0, Path(tmp), augment="none"))
    return entry(default["ratio"], "<= 1.05", detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stage", choices=("finetune", "pretrain", "both"), default="both")
    args = parser.parse_args()
    set_threads()
    stages = ("finetune", "pretrain") if args.stage == "both" else (args.stage,)
    print_json({f"{stage}_overhead": measure(stage, args.quick) for stage in stages})


if __name__ == "__main__":
    main()
