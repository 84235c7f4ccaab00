"""evaluate embedding_cache=true: the same masks as without it, the encoder run once per slice, keys that tell
encoders and volumes apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samadapt.data import Preprocessing, VolumeSlices
from samadapt.embedding_store import EmbeddingStore
from samadapt.inference import PromptSettings, predict_slices
from samadapt.models.registry import build_sam
from samadapt.models.segmenter import SamSegmenter


class CountingEncoder(torch.nn.Module):
    """Wraps an image encoder and counts the images it encodes (same keys under ``inner.``)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.encoded = inner, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        return self.inner(images)


@pytest.fixture(scope="module")
def segmenter() -> SamSegmenter:
    torch.manual_seed(3)
    model = SamSegmenter(build_sam("vit_tiny", 64), 2, "box").eval()
    model.sam.image_encoder = CountingEncoder(model.sam.image_encoder)
    return model


@pytest.fixture(scope="module")
def slices(small_manifests) -> VolumeSlices:
    row = json.loads(small_manifests["brain"].read_text(encoding="utf-8").splitlines()[2])
    return VolumeSlices(row["image"], Preprocessing(image_size=64), "MR", label=row["label"])


@pytest.mark.parametrize("volume_box", [False, True])
def test_stored_embeddings_give_the_same_masks_and_encode_each_slice_once(segmenter, slices, tmp_path, volume_box):
    prompts = PromptSettings("box", seed=0, volume_box=volume_box)
    plain = predict_slices(segmenter, slices, 8, prompts)
    store = EmbeddingStore(tmp_path, segmenter)
    before = segmenter.sam.image_encoder.encoded
    first = predict_slices(segmenter, slices, 8, prompts, store=store)
    encoded = segmenter.sam.image_encoder.encoded - before
    second = predict_slices(segmenter, slices, 8, prompts, store=store)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)
    prompted = int((slices.labels > 0).any(axis=(1, 2)).sum())
    assert encoded == prompted < len(slices)  # slices without a prompt are never encoded
    assert segmenter.sam.image_encoder.encoded - before == encoded  # the second pass read them all
    assert len(list(tmp_path.glob("embeddings/volumes/*/*.npy"))) == prompted


def test_another_encoder_or_another_preprocessing_gets_its_own_folder(segmenter, slices, tmp_path):
    store = EmbeddingStore(tmp_path, segmenter)
    other = SamSegmenter(build_sam("vit_tiny", 64), 2, "box")
    assert EmbeddingStore(tmp_path, other)._folder(slices) != store._folder(slices)
    coronal = VolumeSlices(slices.image_path, Preprocessing(image_size=64, plane="coronal"), "MR")
    assert store._folder(coronal) != store._folder(slices)
