"""Embedding cache for a frozen image encoder: run the encoder once per slice, train the decoder on disk.

With ``encoder=frozen`` the image embedding of a slice never changes, so decoder training can read it
instead of recomputing it (SAMRI reports ~94% less training time). Embeddings are stored as float16
memory maps beside the slice cache, under a key made of the encoder weights' hash, the preprocessing
key, the encoder's input normalisation, the slices chosen and the views. Image-space augmentation cannot be
applied to an embedding: ``views`` > 0 embeds that many augmented copies of each slice up front (with their
augmented labels); ``views`` = 0 trains without augmentation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from samadapt.data.augment import AugmentConfig, augment, build_transform
from samadapt.data.datasets import SliceDataset
from samadapt.embedding_store import encoder_fingerprint
from samadapt.seeds import derived_seed


class EmbeddingDataset(Dataset):
    """Items ``{"embedding": 256 x g x g float32, "label": S x S int64, "case_id", "slice"}``."""

    def __init__(self, slices: SliceDataset, segmenter, cache_root: str | os.PathLike, views: int,
                 augment_config: AugmentConfig | None, seed: int, batch_size: int = 8,
                 device: torch.device | str = "cpu"):
        self.slices, self.views, self.seed, self.epoch = slices, max(views, 1), seed, 0
        # Slice cache entries are keyed by the volume's content and preprocessing, so an edited image or
        # another dataset with the same case ids gets its own embeddings.
        # The seed draws only the augmented views: without views, seeds of a sweep share one cache entry.
        ids = [(slices.entries[e][1].folder.name, slices.entries[e][1].mapping.plane, i) for e, i in slices.items]
        key_source = json.dumps({"encoder": encoder_fingerprint(segmenter.sam.image_encoder),
                                 "input_norm": segmenter.input_norm,
                                 "prep": slices.prep.key(), "items": ids, "views": views,
                                 "seed": seed if views else None,
                                 "augment": None if not views else repr(augment_config)})
        self.folder = Path(cache_root) / "embeddings" / hashlib.sha256(key_source.encode()).hexdigest()[:20]
        if not (self.folder / "index.json").is_file():
            self._build(segmenter, augment_config if views else None, batch_size, device)
        index = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        shape = tuple(index["shape"])
        self.embeddings = np.memmap(self.folder / "embeddings.f16", dtype=np.float16, mode="r", shape=shape)
        self.labels = None
        if views:
            self.labels = np.memmap(self.folder / "labels.u8", dtype=np.uint8, mode="r",
                                    shape=(shape[0], shape[1], *index["label_shape"]))

    def _build(self, segmenter, augment_config, batch_size, device) -> None:
        count, transform = len(self.slices), build_transform(augment_config, True) if augment_config else None
        first = self.slices[0]
        size = first["image"].shape[-1]
        grid = segmenter.sam.prompt_encoder.image_embedding_size[0]  # S/16; S/4 for LiteMedSAM
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=self.folder.parent))
        embeddings = np.memmap(tmp / "embeddings.f16", dtype=np.float16, mode="w+",
                               shape=(count, self.views, 256, grid, grid))
        labels = np.memmap(tmp / "labels.u8", dtype=np.uint8, mode="w+", shape=(count, self.views, size, size)) \
            if transform else None
        encoder_was_training = segmenter.training
        segmenter.eval()
        with torch.no_grad():
            for view in range(self.views):
                for start in tqdm(range(0, count, batch_size), desc=f"embedding cache (view {view + 1}/{self.views})",
                                  disable=None, leave=False):
                    images = []
                    for index in range(start, min(start + batch_size, count)):
                        item = self.slices[index]
                        image, label = item["image"][0].numpy(), item["label"].numpy()
                        if transform:
                            image, label = augment(
                                transform, image, label, derived_seed(self.seed, "view", view, index)
                            )
                            labels[index, view] = label
                        images.append(torch.from_numpy(np.ascontiguousarray(image))[None])
                    batch = torch.stack(images).to(device)  # [0, 1] slices: embed normalises them
                    embeddings[start : start + len(images), view] = segmenter.embed(batch).cpu().numpy()
        segmenter.train(encoder_was_training)
        embeddings.flush()
        if labels is not None:
            labels.flush()
        (tmp / "index.json").write_text(
            json.dumps({"shape": list(embeddings.shape), "label_shape": [size, size]}), encoding="utf-8"
        )
        try:
            os.rename(tmp, self.folder)  # another process may have won the race: keep its copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> dict:
        view = (self.epoch + index) % self.views  # every view is used once per `views` epochs
        item = {
            "embedding": torch.from_numpy(np.array(self.embeddings[index, view], dtype=np.float32)),
            "case_id": self.slices.entries[self.slices.items[index][0]][0].id,
            "slice": self.slices.items[index][1],
        }
        if self.labels is not None:
            item["label"] = torch.from_numpy(self.labels[index, view].astype(np.int64))
        else:
            e, i = self.slices.items[index]
            item["label"] = torch.from_numpy(np.ascontiguousarray(self.slices.entries[e][1].label(i)).astype(np.int64))
        return item
