"""Batched on-device augmentation (``samadapt.data.device_augment``): geometry, labels, seeding, distributions."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from conftest import finetune_args, losses, run_cli
from samadapt.data.augment import AugmentConfig
from samadapt.data.device_augment import (
    BatchParameters,
    adjust_contrast,
    augment_batch,
    augment_on_device,
    batch_generator,
    sampling_grid,
)

SIZE = 32


def batch(count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] (B x 1 x S x S) and an off-centre 3-class label map (B x S x S, int64)."""
    images = torch.rand(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(count, SIZE, SIZE, dtype=torch.long)
    labels[:, 4:14, 6:20] = 1
    labels[:, 18:28, 20:26] = 2
    return images, labels


def test_identity_parameters_give_the_input_back_exactly():
    images, labels = batch()
    out_images, out_labels = augment_batch(BatchParameters.identity(4), images, labels)
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)
    assert out_images is not images  # a new tensor: the loader's batch is not modified


def test_flip_and_quarter_turn_move_pixels_exactly():
    images, labels = batch(2)
    flip = replace(BatchParameters.identity(2), flip=torch.tensor([True, False]))
    out_images, out_labels = augment_batch(flip, images, labels)
    torch.testing.assert_close(out_images[0], images[0].flip(-1), atol=1e-6, rtol=0)
    assert torch.equal(out_labels[0], labels[0].flip(-1)) and torch.equal(out_labels[1], labels[1])
    turn = replace(BatchParameters.identity(2), angle=torch.tensor([math.pi / 2, 0.0], dtype=torch.float64))
    out_images, out_labels = augment_batch(turn, images, labels)
    # a rotation about the centre, not a shear or transpose: one of the two quarter turns, pixel for pixel
    assert any(torch.equal(out_labels[0], labels[0].rot90(k, (0, 1))) for k in (1, -1))
    k = 1 if torch.equal(out_labels[0], labels[0].rot90(1, (0, 1))) else -1
    torch.testing.assert_close(out_images[0, 0], images[0, 0].rot90(k, (0, 1)), atol=1e-5, rtol=0)


def test_zoom_in_enlarges_about_the_centre():
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    labels[0, 9:14, 17:23] = 1  # off-centre, and still inside the image after zooming 1.5x
    zoom = replace(BatchParameters.identity(1), zoom=torch.tensor([1.5], dtype=torch.float64))
    _, out = augment_batch(zoom, labels[:, None].float(), labels)
    before, after = labels[0].nonzero().double(), out[0].nonzero().double()
    assert len(after) == pytest.approx(1.5**2 * len(before), rel=0.15)
    centre = (SIZE - 1) / 2  # the centroid moves 1.5x as far from the image centre
    torch.testing.assert_close(after.mean(0) - centre, 1.5 * (before.mean(0) - centre), atol=0.5, rtol=0)


def test_labels_stay_integer_and_aligned_with_the_image():
    config = AugmentConfig(prob=1.0, gamma=0.0, intensity=0.0)  # geometry only: the image must follow the label
    _, labels = batch(8)
    images = (labels[:, None] / 2).float()  # image = label / 2, so both must move together
    params = BatchParameters.draw(config, 8, batch_generator(7))
    assert params.moves().all()
    out_images, out_labels = augment_batch(params, images, labels)
    assert out_labels.dtype == torch.long and set(out_labels.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_labels, labels)
    agreement = (torch.round(out_images[:, 0] * 2).long() == out_labels).float().mean()
    assert agreement > 0.97  # only bilinear edge pixels may round the other way


def test_same_seed_same_output_and_other_seeds_differ():
    config = AugmentConfig()
    images, labels = batch(6)
    first = augment_batch(BatchParameters.draw(config, 6, batch_generator(3)), images, labels)
    again = augment_batch(BatchParameters.draw(config, 6, batch_generator(3)), images, labels)
    other = augment_batch(BatchParameters.draw(config, 6, batch_generator(4)), images, labels)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert 0.0 <= float(first[0].min()) and float(first[0].max()) <= 1.0


def test_gamma_uses_each_slices_own_range_and_touches_only_its_slice():
    images = torch.stack([torch.linspace(0.2, 0.6, SIZE * SIZE), torch.linspace(0.0, 1.0, SIZE * SIZE)])
    images = images.view(2, 1, SIZE, SIZE)
    gamma = replace(BatchParameters.identity(2), gamma=torch.tensor([2.0, 1.0], dtype=torch.float64))
    out, _ = augment_batch(gamma, images)
    assert torch.equal(out[1], images[1])
    assert float(out[0].min()) == pytest.approx(0.2) and float(out[0].max()) == pytest.approx(0.6, abs=1e-6)
    middle = 0.2 + 0.4 * 0.5**2  # ((x - min) / range) ** 2 * range + min at the range's midpoint
    assert float(out[0].flatten()[SIZE * SIZE // 2]) == pytest.approx(middle, abs=1e-3)


def test_parameter_distributions_follow_the_config():
    config = AugmentConfig(prob=0.5, rotate=15.0, zoom=0.15, gamma=0.4, intensity=0.1)
    params = BatchParameters.draw(config, 4000, batch_generator(0))
    for applied in (params.flip, params.angle != 0, params.zoom != 1, params.gamma != 1, params.shift != 0):
        assert float(applied.double().mean()) == pytest.approx(0.5, abs=0.04)
    assert params.angle.abs().max() <= math.radians(15) and params.angle.abs().max() > math.radians(14)
    assert 0.85 <= params.zoom.min() and params.zoom.max() <= 1.15
    assert 1 / 1.4 <= params.gamma.min() and params.gamma.max() <= 1.4
    assert 0.9 <= params.scale.min() and params.scale.max() <= 1.1 and params.shift.abs().max() <= 0.1
    nothing = AugmentConfig(flip=False, rotate=0, zoom=0, gamma=0, intensity=0)
    off = BatchParameters.draw(nothing, 64, batch_generator(0))
    images, labels = batch(64)
    out_images, out_labels = augment_batch(off, images, labels)
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


def test_item_parameters_do_not_depend_on_how_the_batch_is_split():
    """Two processes (each half of the global batch) draw what one process draws for the whole batch."""
    seeds = [11, 12, 13, 14]
    whole = BatchParameters.for_items(AugmentConfig(), seeds)
    halves = [BatchParameters.for_items(AugmentConfig(), part) for part in (seeds[:2], seeds[2:])]
    for name in ("flip", "angle", "zoom", "gamma", "scale", "shift"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves])), name
    assert not torch.equal(whole.angle, BatchParameters.for_items(AugmentConfig(), [15, 16, 17, 18]).angle)


def test_step_batch_follows_each_items_seed_and_keeps_the_other_entries():
    images, labels = batch(4)
    loader_batch = {"image": images, "label": labels, "case_id": ["a", "b", "c", "d"],
                    "augment_seed": torch.tensor([5, 6, 7, 8])}
    config = AugmentConfig(prob=1.0)
    out = augment_on_device(config, loader_batch)
    assert out["case_id"] == loader_batch["case_id"] and torch.equal(loader_batch["image"], images)
    reversed_batch = {key: value.flip(0) if torch.is_tensor(value) else value[::-1]
                      for key, value in loader_batch.items()}
    back = augment_on_device(config, reversed_batch)  # the same items in another order: the same augmentations
    assert torch.equal(back["image"].flip(0), out["image"]) and torch.equal(back["label"].flip(0), out["label"])
    assert not torch.equal(out["image"], images)



def test_finetune_augments_on_the_device_and_equals_the_loader_path_when_nothing_fires(
        small_manifests, tiny_checkpoint, tmp_path):
    """Through the CLI: with prob=0 both paths train on the same batches (same losses, exactly); with the
    default config the device path changes what the model sees."""
    def run(name: str, **keys) -> dict[int, float]:
        run_cli(*finetune_args(small_manifests["brain"], tiny_checkpoint, tmp_path / name, steps=3, save_every=100,
                               val_every=100, val_split="none", **keys))
        return losses(tmp_path / name)

    device_off = run("device_off", **{"augment.on_device": "true", "augment.prob": 0})
    loader_off = run("loader_off", **{"augment.on_device": "false", "augment.prob": 0})
    device_on = run("device_on", **{"augment.on_device": "true", "augment.prob": 1})
    assert device_off == loader_off
    assert device_on != device_off


def test_sampling_grid_equals_torchs_affine_grid():
    params = BatchParameters.draw(AugmentConfig(prob=1.0), 3, batch_generator(2))
    theta = params.affines().float()
    expected = torch.nn.functional.affine_grid(theta, [3, 1, 20, 28], align_corners=False)
    torch.testing.assert_close(sampling_grid(theta, 20, 28), expected, atol=1e-6, rtol=0)


def test_batched_gamma_equals_monais_adjust_contrast_per_slice():
    from monai.transforms import AdjustContrast

    images = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 0.7 + 0.1
    gamma = torch.tensor([0.7, 1.0, 1.4])
    expected = torch.stack([torch.as_tensor(AdjustContrast(float(g))(images[i])) for i, g in enumerate(gamma)])
    torch.testing.assert_close(adjust_contrast(images, gamma), expected, atol=1e-6, rtol=0)
