"""Torch datasets of cached 2D slices: :class:`SliceDataset` (SSL pools and supervised training)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from samadapt.data.augment import AugmentConfig, augment, build_transform
from samadapt.data.cache import CachedSlices, cached_slices
from samadapt.data.manifest import Case
from samadapt.data.preprocessing import Preprocessing
from samadapt.errors import UserError
from samadapt.seeds import derived_seed


class SliceDataset(Dataset):
    """Slices of ``cases`` through the slice cache.

    Items: ``{"image": float32 1 x S x S in [0, 1], "label": int64 S x S (labeled only),
    "case_id": str, "slice": int, "plane": str, "augment_seed": int}`` (``augment_seed``: what the
    item's augmentation draws from, in ``__getitem__`` or batched on the device).

    * ``skip_empty``: drop slices whose imaged-object fraction (pixels above 0.05) is below this
      (0 = keep all); for labeled data only slices without any foreground label are dropped this way.
    * ``empty_fraction`` (labeled): fraction of slices without foreground labels that is kept
      (chosen with ``seed``), so the model also learns to predict "nothing here".
    * ``num_classes`` (labeled): label values must be below it (checked); None = max label + 1.
    * ``augment``: an :class:`AugmentConfig` (None = no augmentation).
    """

    def __init__(self, cases: list[Case], prep: Preprocessing, cache_dir: str | os.PathLike | None = None,
                 labeled: bool = True, num_classes: int | None = None, skip_empty: float = 0.01,
                 empty_fraction: float = 0.2, augment: AugmentConfig | None = None, seed: int = 0):
        if not 0.0 <= empty_fraction <= 1.0:
            raise UserError(f"empty_fraction={empty_fraction}: must be between 0 and 1")
        if labeled:
            missing = [c.id for c in cases if c.label is None]
            if missing:
                raise UserError(f"cases {', '.join(missing[:5])} have no label — labelled training needs a label "
                                "for every case (fill the manifest's label column or choose another split)")
        self.prep, self.labeled, self.seed = prep, labeled, seed
        self.entries: list[tuple[Case, CachedSlices]] = []
        for case in tqdm(cases, desc="slice cache", unit="volume", disable=None, leave=False):
            for plane in prep.planes:
                entry = cached_slices(case, replace(prep, plane=plane), cache_dir, num_classes, labeled)
                self.entries.append((case, entry))
        values = [v for _, e in self.entries if labeled for v in e.index["label_values"]]
        if labeled:
            _warn_empty_labels(self.entries)
        self.num_classes = num_classes if num_classes is not None else (max(values, default=0) + 1 if labeled else None)
        self.items = self._select(skip_empty, empty_fraction)
        self._transform = build_transform(augment, labeled) if augment is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch: new augmentations every epoch."""
        self.epoch = epoch

    def _select(self, skip_empty: float, empty_fraction: float) -> list[tuple[int, int]]:
        rng = np.random.default_rng(self.seed)
        items = []
        for e, (_, entry) in enumerate(self.entries):
            foreground = entry.index["foreground_fraction"]
            counts = entry.index["class_counts"] if self.labeled else None
            for i in range(len(entry)):
                if counts is not None and counts[i]:
                    items.append((e, i))  # slices showing a structure are always kept
                elif foreground[i] < skip_empty:
                    continue
                elif counts is None or rng.random() < empty_fraction:
                    items.append((e, i))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        e, i = self.items[index]
        case, entry = self.entries[e]
        image = entry.image(i)
        label = entry.label(i) if self.labeled else None
        # A pure function of (seed, epoch, item): the same in every DataLoader worker and process, and the same
        # again after a resumed run replays this epoch — here, or on the device (data.device_augment).
        seed = derived_seed(self.seed, "augment", self.epoch, index)
        if self._transform is not None:
            image, label = augment(self._transform, image, label, seed)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image))[None], "case_id": case.id, "slice": i,
                "plane": entry.mapping.plane, "augment_seed": seed}
        if label is not None:
            item["label"] = torch.from_numpy(np.ascontiguousarray(label))
        return item

    def class_presence(self) -> list[set[int]]:
        """Per item: the foreground classes on that slice (empty set = background only)."""
        return [{int(c) for c in self.entries[e][1].index["class_counts"][i]} for e, i in self.items]

    def sample_weights(self) -> torch.Tensor:
        """Per-item draw weights giving every class (and the empty slices as one group) about the same
        share of draws, so small structures are seen as often as large ones (the training loop's seeded
        sampler draws with them)."""
        if not self.labeled:
            raise ValueError("sample_weights() balances classes and needs labeled=True")
        groups = [present or {0} for present in self.class_presence()]
        totals: dict[int, int] = {}
        for present in groups:
            for c in present:
                totals[c] = totals.get(c, 0) + 1
        return torch.tensor([max(1.0 / totals[c] for c in present) for present in groups], dtype=torch.double)


def _warn_empty_labels(entries: list[tuple[Case, CachedSlices]]) -> None:
    """One warning per case whose label map is background only: training goes on (its slices teach
    "nothing here"), but an empty label is often a wrong file or a label stored in another channel."""
    empty = {case.id: case for case, entry in entries if not any(v > 0 for v in entry.index["label_values"])}
    for case in empty.values():
        print(f"warning: {case.label}: label volume of case {case.id!r} is empty (background only) — "
              "training goes on; check the file if that is unexpected", file=sys.stderr)
