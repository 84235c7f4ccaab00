"""LiteMedSAM (``checkpoint=litemedsam``) on this machine: encoder throughput, what the embedding cache saves,
and where a zero-shot evaluation's time goes (JSON on stdout).

    python bench/bench_litemedsam.py

``encoder_slices_per_s``: ``SamSegmenter.embed`` (normalisation + TinyViT) forward on a batch of 8 real demo
slices (256 px), no grad, after one warm-up slice.

``fast_encoder_speedup``: the same batch through an inference-only copy of the encoder
(:mod:`samadapt.models.fast_inference`: BatchNorm folded, fused attention, channels-last; what inference runs),
median of ``--repeats`` timed runs each after one warm-up; goal >= 2 (issue 17).
``fast_mask_voxels_differing``: box-prompted masks (reference box per slice) of the middle ``--slices`` brain
slices from eager vs fast embeddings; goal 0.

``decoder_epoch_speedup``: one decoder-only epoch (encoder frozen, prompt=box, batch 2) over the slices of a
volume, without the cache (each step encodes its slices, then decodes with grad) vs with it (each step reads
embeddings); both from timed steps, the cache's one-off build (= one encoder pass per slice) reported apart.
Goal: >= 10 x from the second epoch on.

``zero_shot_seconds_per_volume``: ``predict_slices`` with per-slice reference boxes over the demo's
test head (Colin27, 1 mm, axial), the encoder's share timed around ``embed``, then ``case_metrics`` (Dice, IoU,
NSD, HD95).
Only slices holding the brain are encoded (the others have no prompt). The full volume runs ~4 min on 2 cores,
so by default the first ``--slices`` slices with brain are timed and the per-volume figure is extrapolated from
the per-slice times (``detail`` says which); ``--slices 0`` runs the whole volume.
On a GPU (e.g. one H200) the encoder, the cost that dominates here, would take milliseconds per slice.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
from common import entry, machine, median, print_json, quiet_stdout, set_threads, step_times

BATCH = 8


def demo_volume():
    from samadapt.data import Preprocessing, VolumeSlices
    from samadapt.data.demo import ensure_demo_data

    demo = ensure_demo_data(log=lambda message: None)
    return VolumeSlices(demo / "ch2.nii.gz", Preprocessing(image_size=256, plane="axial"), "MR",
                        label=demo / "ch2_brain_mask.nii.gz", num_classes=2)


def segmenter():
    from samadapt.models.checkpoints import load_sam
    from samadapt.models.segmenter import SamSegmenter

    return SamSegmenter(load_sam("vit_t_lite", "litemedsam"), 2, "box").eval()


def encoder_throughput(model, images: torch.Tensor, repeats: int = 1, fast: bool = False) -> dict:
    from samadapt.models.fast_inference import fast_encoder

    with torch.no_grad(), fast_encoder(model) if fast else contextlib.nullcontext():
        start = time.perf_counter()
        model.embed(images[:1])  # warm-up; for the fast path this also builds its copy
        first = time.perf_counter() - start
        seconds = median(step_times(lambda: model.embed(images[:BATCH]), repeats, warmup=0))
    return {"slices_per_s": BATCH / seconds, "batch_seconds": round(seconds, 2), "first_call_s": round(first, 2)}


def mask_differences(model, volume, limit: int) -> dict:
    """Voxels whose box-prompted label differs between eager and fast embeddings, over brain slices."""
    from samadapt.models.fast_inference import fast_encoder
    from samadapt.models.prompts import prompts_from_labels

    with_brain = np.flatnonzero(volume.labels.reshape(len(volume), -1).any(1))
    chosen = with_brain if limit == 0 else with_brain[len(with_brain) // 2 - limit // 2:][:limit]
    differing = foreground = 0
    for start in range(0, len(chosen), BATCH):
        batch = chosen[start:start + BATCH]
        images = torch.from_numpy(np.stack([volume.image_slices(i, i + 1)[0] for i in batch]))[:, None]
        prompts = prompts_from_labels("box", torch.from_numpy(np.stack(
            [volume.label_slices(i, i + 1)[0] for i in batch])), 2)
        masks = []
        for fast in (False, True):
            with torch.no_grad(), fast_encoder(model) if fast else contextlib.nullcontext():
                masks.append(model.predict_labels(model(images, prompts), prompts.present))
        differing += int((masks[0] != masks[1]).sum())
        foreground += int(masks[0].sum())
    return {"differing_voxels": differing, "eager_foreground_voxels": foreground, "slices": len(chosen),
            "slices_with_brain": len(with_brain)}


def decoder_epochs(model, images: torch.Tensor, labels: torch.Tensor, encoder_s_per_slice: float,
                   slices_per_epoch: int) -> dict:
    from samadapt.models.prompts import prompts_from_labels

    model.sam.image_encoder.requires_grad_(False)
    prompts = prompts_from_labels("box", labels[:2], 2)
    with torch.no_grad():
        embeddings = model.embed(images[:2])

    def cached_step():
        logits = model(embeddings=embeddings, prompts=prompts)
        model.loss_fn(logits, labels[:2], prompts.present).backward()

    decoder_step = median(step_times(cached_step, 3, warmup=1))
    steps = slices_per_epoch / 2
    with_cache = steps * decoder_step
    without_cache = steps * (decoder_step + 2 * encoder_s_per_slice)  # the encoder pass under no_grad, frozen
    return {"speedup": without_cache / with_cache, "epoch_with_cache_s": round(with_cache, 1),
            "epoch_without_cache_s": round(without_cache, 1), "decoder_step_s": round(decoder_step, 3),
            "cache_build_s": round(slices_per_epoch * encoder_s_per_slice, 1), "slices_per_epoch": slices_per_epoch}


def zero_shot(model, volume, limit: int) -> dict:
    from samadapt.inference import PromptSettings, predict_slices
    from samadapt.metrics import case_metrics

    encoder_seconds = []
    embed = model.embed

    def timed_embed(images):  # not hooks on the encoder: those would turn the fast CPU copy off
        start = time.perf_counter()
        embeddings = embed(images)
        encoder_seconds.append(time.perf_counter() - start)
        return embeddings

    model.embed = timed_embed
    with_brain = np.flatnonzero(volume.labels.reshape(len(volume), -1).any(1))
    timed = volume if limit == 0 else _Subset(volume, with_brain[:limit])
    start = time.perf_counter()
    prediction = predict_slices(model, timed, BATCH, PromptSettings("box"))
    total = time.perf_counter() - start
    encoder = sum(encoder_seconds)
    tick = time.perf_counter()
    full = np.zeros((len(volume), *prediction.shape[1:]), dtype=prediction.dtype)
    full[with_brain[: len(prediction)] if limit else slice(None)] = prediction
    case_metrics(volume.to_volume(full), volume.reference, volume.geometry["spacing"][::-1], range(1, 2), (1.0, 2.0))
    metrics = time.perf_counter() - tick
    scale = len(with_brain) / len(prediction) if limit else 1.0
    per_volume = {"encoder_s": encoder * scale, "decoder_and_io_s": (total - encoder) * scale, "metrics_s": metrics}
    return {"seconds": sum(per_volume.values()), **{k: round(v, 1) for k, v in per_volume.items()},
            "slices_in_volume": len(volume), "slices_with_brain": int(len(with_brain)),
            "slices_timed": len(prediction), "extrapolated": bool(limit)}


class _Subset:
    """Chosen slices of a VolumeSlices, as ``predict_slices`` reads them (chunks of images and labels)."""

    def __init__(self, volume, indices):
        self.volume, self.indices, self.image_path = volume, indices, volume.image_path

    def chunks(self, size: int):
        for start in range(0, len(self.indices), size):
            chosen = self.indices[start : start + size]
            images = np.stack([self.volume.image_slices(i, i + 1)[0] for i in chosen])
            labels = np.stack([self.volume.label_slices(i, i + 1)[0] for i in chosen])
            yield start, images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=16, help="brain slices to time zero-shot (0 = whole volume)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per encoder variant")
    args = parser.parse_args()
    set_threads()
    with quiet_stdout():
        volume = demo_volume()
        model = segmenter()
        with_brain = np.flatnonzero(volume.labels.reshape(len(volume), -1).any(1))
        middle = with_brain[len(with_brain) // 2 - BATCH // 2 :][:BATCH]
        images = torch.from_numpy(np.stack([volume.image_slices(i, i + 1)[0] for i in middle]))[:, None]
        labels = torch.from_numpy(np.stack([volume.label_slices(i, i + 1)[0] for i in middle]))
        encoder = encoder_throughput(model, images, args.repeats)
        fast = encoder_throughput(model, images, args.repeats, fast=True)
        masks = mask_differences(model, volume, args.slices)
        decoder = decoder_epochs(model, images, labels, 1 / fast["slices_per_s"], len(with_brain))
        evaluation = zero_shot(model, volume, args.slices)
    print_json({
        "machine": machine(),
        "encoder_slices_per_s": entry(encoder["slices_per_s"], "report", encoder),
        "fast_encoder_speedup": entry(fast["slices_per_s"] / encoder["slices_per_s"], ">= 2",
                                      {"eager": encoder, "fast": fast}),
        "fast_mask_voxels_differing": entry(masks["differing_voxels"], "<= 0", masks),
        "decoder_epoch_speedup": entry(decoder["speedup"], ">= 10", decoder),
        "zero_shot_seconds_per_volume": entry(evaluation["seconds"], "report", evaluation),
    })


if __name__ == "__main__":
    main()
