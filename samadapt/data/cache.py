"""The slice cache: each volume's slices decoded once, then memory-mapped.

Layout: ``<cache_dir>/slices/<key>/`` with ``images.f16`` (float16 N x S x S), ``labels.u8`` (uint8
N x S x S, labelled volumes only) and ``index.json`` (shape, per-slice statistics, the
:class:`SliceMapping` back to the volume). ``key`` = sha256 of the image (and label) file contents +
modality + series + ``Preprocessing.key()``, so an edited file or changed parameter makes a new entry.

Entries are built in a private temp folder and renamed into place: with many DataLoader workers or
processes building the same entry, one rename wins and the others discard their copies. File hashes
are remembered per (path, size, mtime) in ``<cache_dir>/hashes/`` so big files are not re-hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from samadapt.data.geometry import SliceMapping
from samadapt.data.manifest import Case
from samadapt.data.preprocessing import Preprocessing
from samadapt.data.readers import check_label_values
from samadapt.errors import UserError
from samadapt.io import cache_root, sha256_file, write_json

FOREGROUND_LEVEL = 0.05  # normalised intensity above which a pixel counts as imaged object
CACHE_FORMAT = 1


class CachedSlices:
    """One cache entry: lazily memory-mapped (safe to pickle into DataLoader workers)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        self.mapping = SliceMapping.from_dict(self.index["mapping"])
        self._images: np.memmap | None = None
        self._labels: np.memmap | None = None

    def __len__(self) -> int:
        return self.index["num_slices"]

    @property
    def has_labels(self) -> bool:
        return self.index["label_values"] is not None

    def _shape(self) -> tuple[int, int, int]:
        return (len(self), self.index["size"], self.index["size"])

    def image(self, i: int) -> np.ndarray:
        """float32 S x S in [0, 1]."""
        if self._images is None:
            self._images = np.memmap(self.folder / "images.f16", dtype=np.float16, mode="r", shape=self._shape())
        return self._images[i].astype(np.float32)

    def label(self, i: int) -> np.ndarray:
        """int64 S x S."""
        if self._labels is None:
            self._labels = np.memmap(self.folder / "labels.u8", dtype=np.uint8, mode="r", shape=self._shape())
        return self._labels[i].astype(np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_labels": None}


def entry_key(case: Case, prep: Preprocessing, cache_dir: Path) -> str:
    image_sha = sha256_file(case.image, cache_dir)[:16]
    label_sha = sha256_file(case.label, cache_dir)[:16] if case.label else "nolabel"
    extra = hashlib.sha256(f"{case.modality}|{case.series_uid}|{CACHE_FORMAT}".encode()).hexdigest()[:8]
    return f"{image_sha}-{label_sha}-{extra}-{prep.key()}"


def cached_slices(case: Case, prep: Preprocessing, cache_dir: str | os.PathLike | None = None,
                  num_classes: int | None = None, labeled: bool = True) -> CachedSlices:
    """The cache entry of ``case`` for one concrete plane of ``prep``, built if missing.

    ``labeled=False`` ignores the case's label (an SSL pool may list labelled volumes)."""
    if prep.plane == "all":
        raise ValueError("cached_slices needs one plane; loop over prep.planes")
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    if not labeled:
        case = replace(case, label=None)
    folder = cache_dir / "slices" / entry_key(case, prep, cache_dir)
    if not (folder / "index.json").is_file():
        _build(case, prep, folder, num_classes)
    entry = CachedSlices(folder)
    if entry.has_labels:  # the entry may have been built for another num_classes
        check_label_values(np.asarray(entry.index["label_values"]), case.label, num_classes)
    return entry


def _build(case: Case, prep: Preprocessing, folder: Path, num_classes: int | None) -> None:
    from samadapt.data.slices import VolumeSlices

    volume = VolumeSlices(case.image, prep, case.modality, case.label, num_classes, case.series_uid)
    n, size = len(volume), prep.image_size
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        images = np.memmap(tmp / "images.f16", dtype=np.float16, mode="w+", shape=(n, size, size))
        labels = None
        if case.label is not None:
            labels = np.memmap(tmp / "labels.u8", dtype=np.uint8, mode="w+", shape=(n, size, size))
        foreground, class_counts, values = [], [], set()
        for start, image_chunk, label_chunk in volume.chunks():
            images[start:start + len(image_chunk)] = image_chunk
            foreground += [float(f) for f in (image_chunk > FOREGROUND_LEVEL).mean(axis=(1, 2))]
            if label_chunk is not None:
                if label_chunk.max(initial=0) > 255:
                    raise UserError(f"{case.label}: label value {int(label_chunk.max())} — the slice cache "
                                    "stores labels as uint8 (at most 255 classes); remap labels")
                labels[start:start + len(label_chunk)] = label_chunk
                for slice_labels in label_chunk:
                    counts = np.bincount(slice_labels.ravel())
                    present = {int(c): int(counts[c]) for c in np.flatnonzero(counts) if c > 0}
                    class_counts.append(present)
                    values.update(int(c) for c in np.flatnonzero(counts))
        images.flush()
        if labels is not None:
            labels.flush()
        del images, labels
        write_json(tmp / "index.json", {
            "format": CACHE_FORMAT, "case_id": case.id, "image": str(case.image),
            "label": str(case.label) if case.label else None, "num_slices": n, "size": size,
            "preprocessing": {**prep.__dict__}, "mapping": volume.mapping.to_dict(),
            "foreground_fraction": foreground, "class_counts": class_counts if case.label else None,
            "label_values": sorted(values) if case.label else None,
        })
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "index.json").is_file():
                raise
            # another worker/process finished the same entry first: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
