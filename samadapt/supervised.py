"""What the supervised training stages (``finetune``, ``baseline``) share: their data and validation keys, the
case split with its ``splits.json``, the labeled slices and the volume-level validator.

The validator scores whole validation volumes through :func:`samadapt.inference.predict_case` (the same
preprocessing, padding and plane as evaluation), keeps the best weights by foreground Dice and counts the
rounds without improvement for early stopping; its state travels with every training state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from samadapt.config import key
from samadapt.data.splits import Split, SplitKeys, choose_split
from samadapt.io import write_json
from samadapt.keys import AugmentKeys, preprocessing

# Stage configs import this module for the keys (``--help``): torch, accelerate, MONAI and the inference path are
# imported inside the functions that run training.


@dataclass(kw_only=True)
class SupervisedKeys(SplitKeys, AugmentKeys):
    """Which labeled slices train, how they are augmented, and how often the validation cases are scored."""

    empty_fraction: float = key(
        0.2, "fraction of slices without foreground that are kept for training", bounds="[0, 1]"
    )
    skip_empty: float = key(
        0.01, "drop background-only slices whose imaged-object fraction is below this", bounds="[0, 1)"
    )
    val_every: int = key(0, "steps between validations; 0 = once per epoch", bounds="[0, inf)")
    patience: int = key(0, "stop after this many validations without a better val Dice; 0 = never", bounds="[0, inf)")
    eval_batch_size: int = key(8, "slices per forward pass in validation", bounds="[1, inf)")


def split_cases(config: Any, manifest: Path, splits_path: Path, main_process: bool) -> Split:
    """The manifest's train/val cases under the config's split keys; the main process writes ``splits.json``."""
    from samadapt.data.manifest import load_manifest

    split = choose_split(load_manifest(manifest), config, manifest, verbose=main_process)
    if main_process:
        write_json(splits_path, {"manifest": str(Path(manifest).absolute()), **split.record})
    return split


def labeled_slices(config: Any, cases: list, augment: bool = True):
    """The training :class:`~samadapt.data.SliceDataset` of ``cases`` (class-balanced draws via
    ``sample_weights``), augmented per slice unless told not or ``augment.on_device`` (then the loss augments
    each batch: :func:`~samadapt.data.device_augment.augment_on_device`)."""
    from samadapt.data import SliceDataset

    per_slice = augment and not config.augment.on_device
    return SliceDataset(cases, preprocessing(config), cache_dir=config.cache_dir, labeled=True,
                        num_classes=config.num_classes, skip_empty=config.skip_empty,
                        empty_fraction=config.empty_fraction, augment=config.augment if per_slice else None,
                        seed=config.seed)


class Validator:
    """Volume-level foreground Dice on the validation ``cases``, segmented with ``settings`` (a
    :class:`~samadapt.inference.PromptSettings`); keeps the best weights (``save(model)``) and the patience
    count. Its state is saved with each training state (``Trainer.fit(stateful=...)``), so a resumed run
    continues the same best score and early-stopping count; ``path`` (validation.json) shows it to the user."""

    def __init__(self, config: Any, cases: list, settings, accelerator,
                 save: Callable[[Any], None], path: Path):
        self.config, self.cases, self.settings, self.accelerator = config, cases, settings, accelerator
        self.prep, self.save, self.path = preprocessing(config), save, path
        self.state = {"best_dice": None, "best_step": None, "bad_rounds": 0, "history": []}

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, state: dict) -> None:
        self.state = state

    def mean_dice(self, model) -> float:
        """Mean over validation cases and foreground classes of the volume Dice (both-empty pairs left out)."""
        import numpy as np

        from samadapt.inference import predict_case
        from samadapt.metrics import case_metrics

        scores = []
        for case in self.cases:
            prediction, slices = predict_case(model, case, self.prep, self.config.eval_batch_size, self.settings,
                                              self.accelerator.device, self.config.num_classes)
            metrics = case_metrics(prediction, slices.reference, slices.geometry["spacing"][::-1],
                                   range(1, self.config.num_classes), surface=False)
            scores += [m["Dice"] for m in metrics.values() if not np.isnan(m["Dice"])]
        return float(np.mean(scores)) if scores else float("nan")

    def __call__(self, step: int, model) -> bool:
        """Validate on the main process, save if best; returns whether to stop (same on every process)."""
        from accelerate.utils import broadcast_object_list

        stop = [False]
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(model)
            dice = self.mean_dice(unwrapped)
            state = self.state
            state["history"].append({"step": step, "val_dice": dice})
            best = state["best_dice"]
            if best is None or (not math.isnan(dice) and (math.isnan(best) or dice > best)):  # NaN is the worst
                state.update(best_dice=dice, best_step=step, bad_rounds=0)
                self.save(unwrapped)
            else:
                state["bad_rounds"] += 1
            write_json(self.path, state)
            print(f"step {step}: val Dice {dice:.4f} (best {state['best_dice']:.4f} at step {state['best_step']})")
            stop = [bool(self.config.patience) and state["bad_rounds"] >= self.config.patience]
        broadcast_object_list(stop)
        return stop[0]


def validation_hook(validator: Validator | None, every: int, steps: int):
    """``after_step`` for :meth:`Trainer.fit`: validate every ``every`` steps and at the end; True = stop."""
    def after_step(step, prepared):
        if validator is not None and (step % every == 0 or step == steps):
            return validator(step, prepared)
        return False
    return after_step


def steps_per_epoch(dataset, config: Any, accelerator) -> int:
    """Optimiser steps that draw ``len(dataset)`` slices (at least 1): ``val_every=0`` validates this often."""
    return max(1, len(dataset) // (config.batch_size * accelerator.num_processes * config.grad_accumulation))
