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
import csv
import io
import json
import math
import os
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
from samadapt.seeds import derived_seed
from samadapt.stage_record import PROGRESS_FILE, saved_states, state_folder
from samadapt.stages import METRICS_FILE, STATE_DIR, TENSORBOARD_DIR

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


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None):
    """AdamW groups: no decay for norms, biases and position tables; optional per-parameter lr scale
    (layer-wise decay). Returns a list of dicts with a ``lr_scale`` entry the loop multiplies in."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or "pos_embed" in name or "rel_pos" in name or "token" in name
        scale = lr_scale(name) if lr_scale else 1.0
        bucket = groups.setdefault((0.0 if no_decay else weight_decay, scale),
                                   {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": scale})
        bucket["params"].append(param)
    return list(groups.values())


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    final_loss: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs ``loss_fn(model, batch)`` for ``keys.steps`` optimiser steps with checkpoint/resume."""

    def __init__(self, accelerator: Accelerator, keys: TrainKeys, out_dir: str | os.PathLike):
        self.accelerator, self.keys, self.out_dir = accelerator, keys, Path(out_dir)
        self.state_root = self.out_dir / STATE_DIR

    # ---------------------------------------------------------------- states
    def saved_states(self) -> list[Path]:
        """Complete training states (renamed into place), oldest first."""
        return saved_states(self.out_dir)

    def _save_state(self, step: int, stateful: dict[str, Any]) -> None:
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

    # ---------------------------------------------------------------- loop
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
        validator's best score. The prepared model stays in ``self.model``."""
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
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
        self.model = model
        stateful = stateful or {}
        start = self._resume(stateful)
        history = self._read_history(start)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        stream = self._batches(loader, start * keys.grad_accumulation)

        board = self._tensorboard(start)
        bar = tqdm(total=keys.steps, initial=start, desc=desc, disable=not acc.is_main_process,
                   dynamic_ncols=True, mininterval=1.0)
        model.train()
        t0, window_start, loss_value, logs = time.perf_counter(), time.perf_counter(), float("nan"), {}
        images_per_step = keys.batch_size * keys.grad_accumulation * acc.num_processes
        step = last_logged = start
        try:  # the bar ends its line even when a step fails, so an error message starts on its own line
            while step < keys.steps:
                factor = lr_factor(step, keys.steps, keys.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = keys.lr * factor * group.get("lr_scale", 1.0)
                loss_sum = torch.zeros((), device=acc.device)
                for micro in range(keys.grad_accumulation):
                    batch = next(stream)
                    # Masks, dropout and prompt jitter come from the global RNG seeded per micro-batch *after*
                    # fetching it (a new DataLoader iterator draws from that RNG): a resumed run draws the same.
                    torch.manual_seed(step_seed(keys.seed, step * keys.grad_accumulation + micro, acc.process_index))
                    last = micro == keys.grad_accumulation - 1
                    with (acc.no_sync(model) if not last else contextlib.nullcontext()), acc.autocast():
                        loss, logs = loss_fn(model, batch)
                        acc.backward(loss / keys.grad_accumulation)
                    loss_sum += loss.detach()
                if keys.max_grad_norm:
                    acc.clip_grad_norm_(params, keys.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % keys.log_every == 0 or step == keys.steps:
                    loss_value = acc.reduce(loss_sum, reduction="mean").item() / keys.grad_accumulation
                    elapsed = time.perf_counter() - window_start
                    row = {"step": step, "loss": round(loss_value, 6), "lr": keys.lr * factor,
                           "images_per_s": round(images_per_step * (step - last_logged) / max(elapsed, 1e-9), 3),
                           **{k: round(float(v), 6) for k, v in (logs() if callable(logs) else logs).items()}}
                    history.append(row)
                    window_start, last_logged = time.perf_counter(), step
                    if acc.is_main_process:
                        self._write_history(history)
                        if board is not None:
                            for name, value in row.items():
                                if name != "step":
                                    board.add_scalar(f"{desc}/{name}", value, step)
                        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{row['images_per_s']:.1f}")
                bar.update(1)
                if after_step is not None:
                    hook_start = time.perf_counter()
                    stop = after_step(step, model)
                    window_start += time.perf_counter() - hook_start  # validation/previews are not training time
                    if stop:
                        break
                # After the hook, so that a saved step has also been validated (the validator's state is saved too).
                if step % keys.save_every == 0 and step < keys.steps:
                    self._save_state(step, stateful)
        finally:
            bar.close()
            if board is not None:
                board.close()
        return TrainResult(steps=step, resumed_from=start or None, final_loss=loss_value,
                           seconds=time.perf_counter() - t0, history=history)

    # ---------------------------------------------------------------- metrics.csv, TensorBoard
    def _tensorboard(self, start: int):
        """A SummaryWriter on out/tensorboard/ (main process, ``tensorboard=true``, package installed), else
        None. ``purge_step`` drops the events a killed run logged after the state it resumes from."""
        if not (self.keys.tensorboard and self.accelerator.is_main_process):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: metrics.csv has the same rows
            return None
        return SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=start or None)

    def _read_history(self, start: int) -> list[dict[str, Any]]:
        """Rows of a previous run up to the resumed step (later rows belong to the lost part)."""
        path = self.out_dir / METRICS_FILE
        if not start or not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as handle:
            return [row for row in csv.DictReader(handle) if int(row["step"]) <= start]

    def _write_history(self, rows: list[dict[str, Any]]) -> None:
        names: list[str] = []
        for row in rows:
            names += [k for k in row if k not in names]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.out_dir / METRICS_FILE, buffer.getvalue())

