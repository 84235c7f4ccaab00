"""The one training loop both training stages use (pretrain and finetune differ in model and loss only).

It steps, logs, checkpoints, resumes and runs multi-process through Hugging Face Accelerate:
- one *step* = one optimiser update = ``grad_accumulation`` micro-batches per process;
- the data order is a pure function of (seed, epoch), the learning rate and the global torch seed pure
  functions of the step, so a training state only needs the step number besides what
  ``accelerator.save_state`` stores (weights, optimiser): resuming a killed run replays exactly the
  same batches and random draws;
- ``out/state/step_<N>/`` is written to a temporary folder and renamed, so a state folder that exists is
  complete; the newest one is resumed from when the same command runs again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from samadapt.errors import UserError
from samadapt.io import failed_write, temporary_name, write_text
from samadapt.keys import TrainKeys
from samadapt.metrics_log import MetricsLog
from samadapt.seeds import derived_seed
from samadapt.stage_record import PROGRESS_FILE, saved_states, state_folder

# loss_fn(model, batch) -> (loss, logs): logs is {name: float}, or a zero-argument callable returning it that
# the loop calls only for the micro-batches whose logs become a metrics row (extra metrics cost nothing
# on the other steps).
LossFn = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, dict[str, float] | Callable[[], dict[str, float]]]"]


def make_accelerator(keys: TrainKeys) -> Accelerator:
    """An Accelerator for this machine: GPU if there is one, CPU (gloo for several processes) otherwise.

    Frozen parts and prompt-dependent branches leave parameters unused in some steps, hence
    ``find_unused_parameters``. Threads are capped so processes sharing the cores do not oversubscribe
    them (measured: 2 processes x 2 threads on 2 cores ran ~10x slower)."""
    if keys.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision=fp16 needs a CUDA GPU (accelerate would silently train in fp32 here) "
                        "— use mixed_precision=bf16 or no on a CPU")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=keys.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # An explicit OMP_NUM_THREADS (e.g. several jobs sharing the cores) wins over the even split.
        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                              else max(1, cores // accelerator.state.num_processes))
        # Without PyTorch's deterministic kernels a threaded CPU backward (the masked pretraining's token
        # gathers) sums in a run-dependent order: the same seed drifted 2e-6 apart in the loss by step 80 and
        # up to 0.016 Dice downstream. Measured at no cost here (150 pretrain steps: 73 s vs 83 s); warn_only
        # so that an op without a deterministic kernel warns instead of stopping a run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    set_seed(keys.seed)
    return accelerator


class EpochSampler(Sampler[int]):
    """Indices in an order fixed by (seed, epoch): a permutation, or weighted draws with replacement."""

    def __init__(self, num_items: int, seed: int, weights: torch.Tensor | None = None):
        self.num_items, self.seed, self.weights, self.epoch = num_items, seed, weights, 0

    def __len__(self) -> int:
        return self.num_items

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "sampler", self.epoch))
        if self.weights is None:
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_items, replacement=True, generator=generator)
        return iter(order.tolist())


def step_seed(seed: int, micro_batch: int, process: int) -> int:
    """The global torch seed of one micro-batch on one process."""
    return derived_seed(seed, "micro_batch", micro_batch, process)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# Parameters named so are position tables or learned tokens (ViT pos_embed and rel_pos, TinyViT's per-head
# attention_biases, mask tokens): 2-D or more, but pulling them towards zero erases position, not capacity.
NO_DECAY_NAMES = ("pos_embed", "rel_pos", "attention_biases", "token")


# A plain-ViT encoder block's index in a parameter name: SAM's blocks (peft-wrapped or not), the MAE encoder's,
# or the bottleneck adapter attached to that block (adapters are numbered in block order).
ENCODER_BLOCK = re.compile(r"(?:encoder\.blocks|adapters\.image_encoder)\.(\d+)\.")


def layer_lr_scale(model: torch.nn.Module, decay: float) -> Callable[[str], float] | None:
    """Layer-wise lr decay (BEiT/MAE fine-tuning) for a plain-ViT encoder: lr multiplier per parameter name.

    Block i of ``depth`` gets decay^(depth - i), the patch embedding and position table decay^(depth + 1),
    everything after the last block (neck, decoders, heads) 1. ``depth`` counts frozen blocks too, so LoRA on a
    few blocks is scaled by where they sit. None when ``decay`` is 1. TinyViT names do not match: the configs
    refuse ``layer_decay`` for it (:func:`samadapt.keys.check_layer_decay`)."""
    if decay == 1:
        return None
    indices = [int(match.group(1)) for name, _ in model.named_parameters() if (match := ENCODER_BLOCK.search(name))]
    depth = max(indices, default=-1) + 1

    def scale(name: str) -> float:
        match = ENCODER_BLOCK.search(name)
        if match:
            return decay ** (depth - int(match.group(1)))
        if "patch_embed" in name or name.endswith("pos_embed"):
            return decay ** (depth + 1)
        return 1.0
    return scale


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None):
    """AdamW groups: no decay for norms, biases and position tables (``NO_DECAY_NAMES``); optional per-parameter
    lr scale (layer-wise decay). Returns a list of dicts with a ``lr_scale`` entry the loop multiplies in."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or any(part in name for part in NO_DECAY_NAMES)
        scale = lr_scale(name) if lr_scale else 1.0
        bucket = groups.setdefault((0.0 if no_decay else weight_decay, scale),
                                   {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": scale})
        bucket["params"].append(param)
    return list(groups.values())

@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did: steps reached (1-based), the step it resumed from, the last logged loss."""

    steps: int
    resumed_from: int | None
    final_loss: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str:
    """The first trainable weight, else the first gradient, holding a NaN/Inf (a full scan: for error messages)."""
    for name, param in named:
        if not torch.isfinite(param.detach()).all():
            return f"parameter {name}"
    for name, param in named:
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return f"gradient of {name}"
    return "none among the trainable weights and their gradients"


class Trainer:
    """Runs ``loss_fn(model, batch)`` for ``keys.steps`` optimiser steps with checkpoint/resume."""

    def __init__(self, accelerator: Accelerator, keys: TrainKeys, out_dir: str | os.PathLike):
        self.accelerator, self.keys, self.out_dir = accelerator, keys, Path(out_dir)
        self._named: list[tuple[str, torch.nn.Parameter]] = []  # (name, parameter) the optimiser updates, in order

    # ---------------------------------------------------------------- the loop
    def fit(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        loss_fn: LossFn,
        *,
        groups: list[dict[str, Any]] | None = None,
        sample_weights: torch.Tensor | None = None,
        collate_fn: Callable | None = None,
        after_step: Callable[[int, torch.nn.Module], bool | None] | None = None,
        stateful: dict[str, Any] | None = None,
        desc: str = "train",
    ) -> TrainResult:
        """Train ``model`` (unprepared) and return when ``keys.steps`` are done or ``after_step`` says stop.

        ``loss_fn(prepared_model, batch) -> (scalar loss, logs)`` runs under autocast (see ``LossFn``).
        ``after_step(step, prepared_model)`` runs on every process after each step (previews,
        validation); returning True stops training early. ``stateful`` objects (``state_dict()`` →
        JSON-able dict, ``load_state_dict``) are saved with every state and restored on resume, e.g. a
        validator's best score. The prepared model stays in ``self.model``.

        A non-finite loss or gradient norm (any process), or non-finite weights before a state is saved or
        after the last step, is a UserError naming the step and the first non-finite tensor: a diverged run
        never leaves a state or a result behind."""
        acc, keys = self.accelerator, self.keys
        model, optimizer, loader = self._prepare(model, dataset, groups, sample_weights, collate_fn)
        self.model, stateful = model, stateful or {}
        start = self._resume(stateful)
        names = {id(p): name for name, p in acc.unwrap_model(model).named_parameters()}
        self._named = [(names.get(id(p), f"param_groups[{i}][{j}]"), p)
                       for i, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])]
        stream = self._batches(loader, start * keys.grad_accumulation)
        metrics = MetricsLog(self.out_dir, acc, keys, start, desc)
        bar = tqdm(total=keys.steps, initial=start, desc=desc, disable=not acc.is_main_process,
                   dynamic_ncols=True, mininterval=1.0)
        model.train()
        t0, step, loss_value = time.perf_counter(), start, float("nan")
        try:  # the bar ends its line even when a step fails, so an error message starts on its own line
            while step < keys.steps:
                loss_sum, logs, lr = self._optimizer_step(model, optimizer, stream, loss_fn, step)
                step += 1
                if step % keys.log_every == 0 or step == keys.steps:
                    loss_value = self._log(metrics, bar, step, lr, loss_sum, logs)
                bar.update(1)
                if after_step is not None:
                    with metrics.paused():  # validation and previews are not training time
                        if after_step(step, model):
                            break
                # After the hook, so that a saved step has also been validated (the validator's state is saved too).
                if step % keys.save_every == 0 and step < keys.steps:
                    self._save_state(step, stateful)
            self._check_weights(step)  # what the stage exports next
        finally:
            bar.close()
            metrics.close()
        return TrainResult(steps=step, resumed_from=start or None, final_loss=loss_value,
                           seconds=time.perf_counter() - t0, history=metrics.rows)

    def _prepare(self, model, dataset, groups, sample_weights, collate_fn):
        """(model, AdamW, DataLoader over a seeded :class:`EpochSampler`), prepared by accelerate (moved to the
        device, wrapped for several processes, the loader sharded across them)."""
        acc, keys = self.accelerator, self.keys
        if len(dataset) < keys.batch_size * acc.num_processes:
            raise UserError(f"only {len(dataset)} training items for batch_size={keys.batch_size} x "
                            f"{acc.num_processes} processes — lower batch_size or add data")
        sampler = EpochSampler(len(dataset), keys.seed, sample_weights)
        loader = DataLoader(dataset, batch_size=keys.batch_size, sampler=sampler, drop_last=True,
                            num_workers=keys.num_workers, collate_fn=collate_fn,
                            persistent_workers=False, pin_memory=acc.device.type == "cuda")
        groups = groups if groups is not None else param_groups(model, keys.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=keys.lr)
        return acc.prepare(model, optimizer, loader)

    def _optimizer_step(self, model, optimizer, stream: Iterator[Any], loss_fn: LossFn, step: int):
        """The 0-based ``step``: the scheduled lr (keys.lr x schedule x each group's ``lr_scale``),
        ``grad_accumulation`` micro-batches forward and backward, clipping, a health check, the update.

        Returns (sum of the micro-batch losses: 0-dim tensor on the device, the last logs, the scheduled lr)."""
        acc, keys = self.accelerator, self.keys
        lr = keys.lr * lr_factor(step, keys.steps, keys.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum, logs = torch.zeros((), device=acc.device), {}
        for micro in range(keys.grad_accumulation):
            batch = next(stream)
            # Masks, dropout and prompt jitter come from the global RNG seeded per micro-batch *after*
            # fetching it (a new DataLoader iterator draws from that RNG): a resumed run draws the same.
            torch.manual_seed(step_seed(keys.seed, step * keys.grad_accumulation + micro, acc.process_index))
            last = micro == keys.grad_accumulation - 1
            # Processes all-reduce gradients in the last micro-batch's backward only.
            with (acc.no_sync(model) if not last else contextlib.nullcontext()), acc.autocast():
                loss, logs = loss_fn(model, batch)
                acc.backward(loss / keys.grad_accumulation)
            loss_sum += loss.detach()
        grad_norm = acc.clip_grad_norm_([p for _, p in self._named], keys.max_grad_norm) if keys.max_grad_norm else None
        self._check_step(step + 1, loss_sum, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, logs, lr

    def _log(self, metrics: MetricsLog, bar, step: int, lr: float, loss_sum: torch.Tensor, logs) -> float:
        """The metrics row of ``step`` (every process: the loss is averaged across them); returns its loss."""
        loss = self.accelerator.reduce(loss_sum, reduction="mean").item() / self.keys.grad_accumulation
        row = metrics.add(step, loss, lr, logs)
        if self.accelerator.is_main_process:
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['images_per_s']:.1f}")
        return loss

    # ---------------------------------------------------------------- non-finite training
    def _check_step(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """UserError if step ``step``'s loss (summed over micro-batches) or gradient norm is NaN/Inf on any
        process, before the update is applied.

        Costs one all-reduce of two numbers and one host sync per step; every process reaches the same
        decision, so none is left waiting in a collective that another one skipped."""
        # Under fp16 the GradScaler expects an overflowing (inf) gradient now and then and skips that step.
        checked = grad_norm is not None and self.accelerator.scaler is None
        norm = grad_norm.detach().float().to(loss_sum.device) if checked else torch.zeros((), device=loss_sum.device)
        loss, norm = self.accelerator.reduce(torch.stack([loss_sum.float(), norm]), reduction="sum").tolist()
        if not math.isfinite(loss):
            raise self._nonfinite(step, f"loss is {loss}")
        if not math.isfinite(norm):
            raise self._nonfinite(step, f"gradient norm is {norm}")

    def _check_weights(self, step: int) -> None:
        """UserError if a trainable weight is NaN/Inf after ``step``: run before a state is saved and after the
        last step (one max-abs per tensor and one sync; a bad update also shows in the next step's loss)."""
        peaks = torch.stack([torch.linalg.vector_norm(p.detach(), float("inf")).float() for _, p in self._named
                             if p.numel()])
        bad = (~torch.isfinite(peaks)).any().float()
        if self.accelerator.reduce(bad, reduction="sum").item():
            raise self._nonfinite(step, "the weights are non-finite after the optimiser step")

    def _nonfinite(self, step: int, what: str) -> UserError:
        keys = self.keys
        return UserError(f"step {step}: {what} — first non-finite tensor: {first_nonfinite(self._named)} "
                         f"(lr={keys.lr:g}, weight_decay={keys.weight_decay:g}, max_grad_norm={keys.max_grad_norm}: "
                         "check these keys, the input data and the checkpoint)")

    # ---------------------------------------------------------------- states
    def saved_states(self) -> list[Path]:
        """Complete training states (renamed into place), oldest first."""
        return saved_states(self.out_dir)

    def _save_state(self, step: int, stateful: dict[str, Any]) -> None:
        self._check_weights(step)  # a state that exists is one worth resuming from
        acc = self.accelerator
        final = state_folder(self.out_dir, step)
        tmp = temporary_name(final, shared=True)  # one name for every rank
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
        except Exception as exc:  # disk full / size limit: one line naming the state, no half state left
            shutil.rmtree(tmp, ignore_errors=True)
            failed = failed_write(exc, final)
            if failed is not None:
                raise failed from exc
            raise
        acc.wait_for_everyone()
        if acc.is_main_process:
            objects = {name: obj.state_dict() for name, obj in stateful.items()}
            write_text(tmp / PROGRESS_FILE, json.dumps({"step": step, "objects": objects}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.saved_states()[: -self.keys.keep_states]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _resume(self, stateful: dict[str, Any]) -> int:
        states = self.saved_states() if self.keys.resume else []
        if not states:
            return 0
        newest = states[-1]
        self.accelerator.load_state(str(newest))
        progress = json.loads((newest / PROGRESS_FILE).read_text(encoding="utf-8"))
        for name, obj in stateful.items():
            obj.load_state_dict(progress["objects"][name])
        return progress["step"]

    # ---------------------------------------------------------------- data
    def _batches(self, loader: DataLoader, first_micro: int) -> Iterator[Any]:
        """Micro-batches forever, starting at micro-batch ``first_micro`` of the seeded epoch sequence."""
        per_epoch = len(loader)
        epoch, skip = divmod(first_micro, per_epoch)
        while True:
            current = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            # Accelerate's loaders own the epoch and pass it to the sampler when iterated (a resumed loader
            # would restart at its own epoch 0); the dataset's augmentation seeds follow it too.
            current.set_epoch(epoch)
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            yield from current
            epoch, skip = epoch + 1, 0
