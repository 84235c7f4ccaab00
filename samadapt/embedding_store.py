"""Image embeddings of whole volumes on disk, for inference with an encoder that stays the same.

Evaluating one encoder several times on the same volume — zero-shot with per-slice boxes, then with a 3-D
box, then a decoder fine-tuned on that frozen encoder — needs its embeddings once: LiteMedSAM's encoder takes
~1.7 s per slice on a 2-core CPU, its decoder a few ms. ``evaluate embedding_cache=true`` keeps them under
``<cache>/embeddings/volumes/<key>/``, where the key covers the encoder's weights and input normalisation, the
image file's content (and DICOM series), its modality and the preprocessing. Stored as float32, so masks are
the same as without the store; slices are computed on first use only (prompted inference skips slices
without prompts).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from samadapt.data import VolumeSlices
from samadapt.io import atomic_path, sha256_file
from samadapt.models.fast_inference import fast_encoder


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 over the encoder's parameter and buffer bytes (names included)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class EmbeddingStore:
    """Embeddings of ``model``'s image encoder (a SamSegmenter) per volume, under ``root``."""

    def __init__(self, root: str | os.PathLike, model) -> None:
        self.root, self.model = Path(root) / "embeddings" / "volumes", model
        self.encoder = encoder_fingerprint(model.sam.image_encoder)

    def _folder(self, slices: VolumeSlices) -> Path:
        source = slices.image_path
        content = sha256_file(source) if source.is_file() else sorted(  # a DICOM series folder
            (p.name, sha256_file(p)) for p in source.iterdir() if p.is_file())
        key = json.dumps({"encoder": self.encoder, "input_norm": self.model.input_norm, "image": content,
                          "series": slices.series_uid, "modality": slices.modality, "prep": slices.prep.key()})
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:20]

    def embeddings(self, slices: VolumeSlices, indices: list[int], batch_size: int,
                   device: torch.device | str) -> dict[int, torch.Tensor]:
        """``{slice: 256 x g x g float32 embedding on the CPU}`` for ``indices``; missing ones are encoded in
        batches of ``batch_size`` and stored (one ``<slice>.npy`` each, written atomically)."""
        folder = self._folder(slices)
        found = {i: torch.from_numpy(np.load(folder / f"{i}.npy")) for i in indices if (folder / f"{i}.npy").is_file()}
        missing = [i for i in indices if i not in found]
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
        for index, embedding in encode_slices(self.model, slices, missing, batch_size, device).items():
            with atomic_path(folder / f"{index}.npy") as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, embedding.numpy())
            found[index] = embedding
        return found


def encode_slices(model, slices: VolumeSlices, indices: list[int], batch_size: int,
                  device: torch.device | str) -> dict[int, torch.Tensor]:
    """``{slice: 256 x g x g float32 embedding on the CPU}`` of ``model``'s encoder (a SamSegmenter's ``embed``)
    for the slices ``indices``, in batches of ``batch_size`` (a TinyViT encoder on the CPU runs as its fast copy,
    :mod:`samadapt.models.fast_inference`: same masks)."""
    encoded: dict[int, torch.Tensor] = {}
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        images = torch.from_numpy(np.concatenate([slices.image_slices(i, i + 1) for i in batch]))[:, None]
        with torch.no_grad(), fast_encoder(model):
            encoded.update(zip(batch, model.embed(images.to(device)).float().cpu()))
    return encoded
