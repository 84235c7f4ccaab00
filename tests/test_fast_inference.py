"""The fast CPU encoder copy (:mod:`samadapt.models.fast_inference`) on real LiteMedSAM weights and demo slices:
embeddings as the eager encoder's up to fp32 rounding, identical box-prompted masks, rebuilt after a weight
update, and not used where it does not apply (autograd on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SLICES = 2  # axial slices of the demo's test head (Colin27) holding the brain; ~2 s of encoder each

# Embeddings of LiteMedSAM are O(1) (|e| <= ~3); folding BatchNorm and fusing attention change only the order of
# fp32 operations, measured max |difference| ~1e-5.
ATOL = 1e-4


@pytest.fixture(scope="module")
def demo_slices(demo_dir):
    """SLICES brain slices of Colin27 at 256 px: images SLICES x 1 x 256 x 256 in [0, 1], labels SLICES x 256 x 256."""
    from samadapt.data import Preprocessing, VolumeSlices

    volume = VolumeSlices(demo_dir / "ch2.nii.gz", Preprocessing(image_size=256, plane="axial"), "MR",
                          label=demo_dir / "ch2_brain_mask.nii.gz", num_classes=2)
    with_brain = np.flatnonzero(volume.labels.reshape(len(volume), -1).any(1))
    chosen = with_brain[np.linspace(len(with_brain) // 4, 3 * len(with_brain) // 4, SLICES).astype(int)]
    images = np.stack([volume.image_slices(i, i + 1)[0] for i in chosen])
    labels = np.stack([volume.label_slices(i, i + 1)[0] for i in chosen])
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)


@pytest.fixture(scope="module")
def model():
    from samadapt.models.checkpoints import load_sam
    from samadapt.models.segmenter import SamSegmenter

    return SamSegmenter(load_sam("vit_t_lite", "litemedsam"), 2, "box").eval()


def test_fast_encoder_matches_eager_embeddings_and_masks(model, demo_slices):
    from samadapt.models import fast_inference
    from samadapt.models.prompts import prompts_from_labels

    images, labels = demo_slices
    prompts = prompts_from_labels("box", labels, 2)  # the reference box of the brain in each slice
    with torch.no_grad():
        eager = model.embed(images)
        eager_masks = model.predict_labels(model(embeddings=eager, prompts=prompts), prompts.present)
        with fast_inference.fast_encoder(model):
            fast = model.embed(images)
            fast_masks = model.predict_labels(model(images, prompts), prompts.present)
    assert "forward" not in vars(model.sam.image_encoder)  # the block leaves the encoder as it was
    assert not torch.equal(fast, eager)  # the fast copy really ran (its rounding differs)
    torch.testing.assert_close(fast, eager, atol=ATOL, rtol=0)
    assert eager_masks.sum() > 1000  # the brain is segmented, so equal masks say something
    assert torch.equal(fast_masks, eager_masks)


def test_fast_copy_follows_weight_updates_and_skips_autograd(model, demo_slices):
    from samadapt.models import fast_inference

    encoder = model.sam.image_encoder
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        first = fast_inference.fast_encoder_for(encoder)
        assert fast_inference.fast_encoder_for(encoder) is first  # cached while the weights stay
        neck = encoder.neck[0].weight
        saved = neck.clone()
        neck.mul_(2.0)  # an in-place update, as an optimiser step does
        try:
            assert fast_inference.fast_encoder_for(encoder) is not first
            torch.testing.assert_close(fast_inference.encode(encoder, x), encoder(x), atol=ATOL, rtol=0)
        finally:
            neck.copy_(saved)
    assert not fast_inference.applies(encoder, x)  # autograd on: the original encoder runs (training)
