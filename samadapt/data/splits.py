"""Which cases a supervised stage trains and validates on: the manifest's split, completed like nnU-Net.

Rules (one place; ``finetune`` and ``baseline`` both call :func:`choose_split`):

* Rows of split ``test`` are never used (to train or validate).
* ``fold=none`` (default): ``train`` = the rows of ``split``; ``val`` = the rows of ``val_split``. When the
  manifest names no ``val_split`` rows, a **hold-out** is made: the first fold (``folds`` folds) of the
  train and unsplit rows. Unsplit rows (empty ``split``) train otherwise. One case and nothing to validate
  on: it trains without validation (a warning says so). ``val_split=none`` switches validation off.
* ``fold=k``: **cross-validation** over the development cases (every row but the test rows): fold ``k``
  validates (unless ``val_split=none``), the other folds train. A manifest ``fold`` column (``data import
  --folds``) decides the folds of the rows that carry one; without it the folds are nnU-Net's
  ``generate_crossval_split``: ``KFold(folds, shuffle=True, random_state=split_seed)`` over the sorted case
  ids — with the default ``split_seed=12345`` the folds equal nnU-Net's ``splits_final.json`` for the same ids.
* ``train_cases=n`` (few-shot) then keeps ``n`` of the training cases, chosen with ``seed``.

Splits are by case (a volume is never in two roles), seeded by ``split_seed`` (not ``seed``, so a seed
sweep varies training, not the split), and recorded: :attr:`Split.record` is a stage's ``splits.json``.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samadapt.config import key
from samadapt.errors import UserError

if TYPE_CHECKING:  # the manifest reader pulls in scipy: not at --help time, when the keys are read
    from samadapt.data.manifest import Case

NNUNET_SPLIT_SEED = 12345  # nnU-Net's generate_crossval_split default


@dataclass(kw_only=True)
class SplitKeys:
    """The keys of :func:`choose_split` (``finetune`` and ``baseline``)."""

    split: str = key("train", "manifest split to train on (rows without a split are split by case)")
    val_split: str | None = key(
        "val", "manifest split for validation (volume Dice); none = no validation; no such rows = a hold-out"
    )
    folds: int = key(5, "folds of the case split (cross-validation; the hold-out is one fold)", bounds="[2, 1000]")
    fold: int | None = key(
        None, "cross-validation: validate on fold k (0..folds-1), train on the others; none = no CV",
        bounds="[0, inf)",
    )
    split_seed: int = key(
        NNUNET_SPLIT_SEED, "seed of the case split (12345 = nnU-Net's folds); seed= varies training only",
        bounds="[0, inf)",
    )
    train_cases: int | None = key(
        None, "few-shot: train on this many labeled volumes (chosen with seed)", bounds="[1, inf)"
    )


def check_split_keys(keys: SplitKeys) -> None:
    """The split keys' own checks, when the config is built (ValueError → a one-line error naming the key)."""
    for name in ("split", "val_split"):
        if getattr(keys, name) == "test":
            raise ValueError(f"{name}=test: test rows are never trained or validated on — use train / val")
    if keys.split == keys.val_split:
        raise ValueError(f"split={keys.split} and val_split={keys.val_split}: a case would train and validate")


def kfold(ids: list[str], folds: int, seed: int) -> list[list[str]]:
    """nnU-Net's cross-validation folds of ``ids``: sorted, then ``sklearn.model_selection.KFold(folds,
    shuffle=True, random_state=seed)`` — a ``numpy.random.RandomState(seed)`` shuffle of the indices cut into
    consecutive folds, the first ``len % folds`` one case larger (sklearn's own recipe, so no sklearn needed)."""
    import numpy as np

    ordered = sorted(ids)
    if not 2 <= folds <= len(ordered):
        raise ValueError(f"kfold: {len(ordered)} cases cannot make {folds} folds")
    indices = np.arange(len(ordered))
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(folds, len(ordered) // folds)
    sizes[: len(ordered) % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [[ordered[i] for i in indices[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class Split:
    """The chosen cases: ``train`` and ``val`` (manifest order) and the record written as ``splits.json``."""

    train: list[Case]
    val: list[Case]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        """The record without the case lists (for a stage's metrics)."""
        return {k: v for k, v in self.record.items() if k in ("scheme", "folds", "fold", "split_seed")}


def fold_column_split(pool: list[Case], fold: int) -> tuple[list[Case], list[Case], int]:
    """(train, val, number of folds) from the manifest's ``fold`` column of ``pool``: fold ``fold`` validates."""
    numbered = [c for c in pool if c.fold is not None]
    count = max(c.fold for c in numbered) + 1
    if not 0 <= fold < count:
        raise UserError(f"fold={fold}: the manifest's fold column has folds 0..{count - 1} — choose one of them")
    return [c for c in numbered if c.fold != fold], [c for c in numbered if c.fold == fold], count


def choose_split(cases: list[Case], keys: Any, source: str | Path, verbose: bool = True) -> Split:
    """The train/val cases of a manifest's ``cases`` under ``keys`` (:class:`SplitKeys` and ``seed``), by the
    module's rules; ``source`` names the manifest in errors and (``verbose``: printed) notes and warnings."""
    train_rows = [c for c in cases if c.split == keys.split]
    val_rows = [c for c in cases if keys.val_split and c.split == keys.val_split]
    unsplit = [c for c in cases if c.split == ""]
    record: dict[str, Any] = {"split_seed": keys.split_seed, "folds": keys.folds, "fold": keys.fold}
    if keys.fold is not None:
        train, val, record = _cross_validation([c for c in cases if c.split != "test"], keys, source, record)
        val = val if keys.val_split else []  # val_split=none: the held-out fold trains nothing and validates nothing
    elif val_rows or not keys.val_split:
        train, val = train_rows + unsplit, val_rows
        record.update(scheme="manifest", folds=None)
    else:
        train, val, record = _hold_out(train_rows + unsplit, keys, source, record, verbose)
    train = _few_shot(train, keys.train_cases, keys.seed)
    _require_labels([*train, *val], source)
    chosen = {c.id for c in (*train, *val)}
    record.update(train=sorted(c.id for c in train), val=sorted(c.id for c in val),
                  test=sorted(c.id for c in cases if c.split == "test"),
                  unused=sorted(c.id for c in cases if c.id not in chosen and c.split != "test"))
    return Split(_in_order(cases, train), _in_order(cases, val), record)


def _cross_validation(pool: list[Case], keys: Any, source, record: dict) -> tuple[list, list, dict]:
    if any(c.fold is not None for c in pool):
        train, val, count = fold_column_split(pool, keys.fold)
        record.update(scheme="manifest fold column", folds=count)
        return train, val, record
    if len(pool) < keys.folds:
        raise UserError(f"{source}: fold={keys.fold} needs at least folds={keys.folds} development cases (train, val "
                        f"or unsplit rows), found {len(pool)} — lower folds= or add cases")
    if keys.fold >= keys.folds:
        raise UserError(f"fold={keys.fold}: with folds={keys.folds} choose fold 0..{keys.folds - 1}")
    parts = kfold([c.id for c in pool], keys.folds, keys.split_seed)
    held = set(parts[keys.fold])
    record.update(scheme="cross-validation", splits_final=_nnunet_splits(parts))
    return [c for c in pool if c.id not in held], [c for c in pool if c.id in held], record


def _hold_out(pool: list[Case], keys: Any, source, record: dict, verbose: bool) -> tuple[list, list, dict]:
    """No val rows: the first of ``folds`` folds validates (fewer cases than folds: one case per fold)."""
    if len(pool) < 2:
        if verbose:
            print(f"warning: {source}: {len(pool)} case to train on and no split={keys.val_split} rows — "
                  "training without validation (add cases or val rows to validate)", file=sys.stderr)
        record.update(scheme="no validation (one case)", folds=None)
        return pool, [], record
    folds = min(keys.folds, len(pool))
    parts = kfold([c.id for c in pool], folds, keys.split_seed)
    held = set(parts[0])
    if verbose:
        print(f"{source}: no split={keys.val_split} rows — holding out {len(held)} of {len(pool)} cases for "
              f"validation (fold 0 of {folds}, split_seed={keys.split_seed}; see splits.json)")
    record.update(scheme="hold-out", folds=folds, fold=0, splits_final=_nnunet_splits(parts))
    return [c for c in pool if c.id not in held], [c for c in pool if c.id in held], record


def _nnunet_splits(parts: list[list[str]]) -> list[dict[str, list[str]]]:
    """Every fold in nnU-Net's ``splits_final.json`` layout: ``[{"train": [...], "val": [...]}, ...]``."""
    return [{"train": sorted(i for j, p in enumerate(parts) if j != k for i in p), "val": sorted(part)}
            for k, part in enumerate(parts)]


def _few_shot(train: list[Case], count: int | None, seed: int) -> list[Case]:
    """Few-shot: ``count`` of the training cases chosen with ``seed`` (all when count is None)."""
    if count is None:
        return train
    if count > len(train):
        raise UserError(f"train_cases={count} but the training split has only {len(train)} labeled volumes")
    return random.Random(seed).sample(sorted(train, key=lambda c: c.id), count)


def _require_labels(cases: list[Case], source) -> None:
    if not cases:
        raise UserError(f"{source}: no cases to train on (every row is test or of another split) — give rows "
                        "split=train or leave their split empty")
    missing = [c.id for c in cases if c.label is None]
    if missing:
        raise UserError(f"{source}: case(s) {', '.join(missing[:5])} have no label but would train or validate — "
                        "fill their label column or set their split to test")


def _in_order(cases: list[Case], chosen: list[Case]) -> list[Case]:
    ids = {c.id for c in chosen}
    return [c for c in cases if c.id in ids]
