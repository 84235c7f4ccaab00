"""The augmentations of :mod:`samadapt.data.augment` on a whole batch, on the device it is already on.

Same :class:`~samadapt.data.augment.AugmentConfig` and the same distributions as the per-slice MONAI
``Compose`` (flip → rotate → zoom → gamma → intensity scale → shift, each applied with ``prob``, image clipped
to [0, 1]), but after the batch reaches the GPU, so the DataLoader only reads cached slices:

- flip, rotation and zoom are composed into one 2 x 3 affine per slice and applied with one batched
  ``affine_grid`` + ``grid_sample`` (image bilinear, label nearest, zero padding) — one resampling where
  MONAI resamples once for the rotation and once for the zoom, so images are slightly less smoothed;
- gamma is MONAI's ``AdjustContrast`` (per slice: its min/max are the slice's own), scale and shift are
  ``RandScaleIntensity``'s ``x * (1 + f)`` and ``RandShiftIntensity``'s ``x + o``, vectorised.

Per-slice parameters come from a CPU ``torch.Generator`` (:func:`batch_generator`, seeded from the step's
seed by :func:`samadapt.seeds.derived_seed`), a fixed number of draws per slice whatever is enabled: the same
step gives the same augmentation on any device, after a resume, in any process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samadapt.data.augment import AugmentConfig
from samadapt.seeds import derived_seed


def batch_generator(step_seed: int) -> torch.Generator:
    """The generator of one micro-batch's augmentation, fixed by its step seed (``training.step_seed``)."""
    return torch.Generator().manual_seed(derived_seed(step_seed, "device_augment"))


@dataclass(frozen=True)
class BatchParameters:
    """Per-slice parameters of a batch of B slices, each a length-B CPU tensor; identity values mean "not
    applied" (flip False, angle 0, zoom 1, gamma 1, scale 1, shift 0)."""

    flip: torch.Tensor  # bool: mirror left-right
    angle: torch.Tensor  # in-plane rotation, radians
    zoom: torch.Tensor  # > 1 zooms in (MONAI's zoom factor, size kept)
    gamma: torch.Tensor
    scale: torch.Tensor  # intensity factor 1 + f
    shift: torch.Tensor  # intensity offset

    @classmethod
    def identity(cls, batch: int) -> BatchParameters:
        ones, zeros = torch.ones(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.float64)
        return cls(torch.zeros(batch, dtype=torch.bool), zeros, ones, ones, ones, zeros)

    @classmethod
    def draw(cls, config: AugmentConfig, batch: int, generator: torch.Generator) -> BatchParameters:
        """Parameters as the MONAI pipeline draws them: each transform fires with ``config.prob``; angle
        uniform in ±rotate degrees, zoom in 1 ± zoom, gamma in [1/(1+g), 1+g], scale 1 + U(±intensity),
        shift U(±intensity)."""

        def fires(enabled: bool) -> torch.Tensor:
            return (torch.rand(batch, generator=generator, dtype=torch.float64) < config.prob) & enabled

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)

        flip = fires(config.flip)
        angle = torch.where(fires(config.rotate > 0), uniform(-1, 1) * math.radians(config.rotate), 0.0)
        zoom = torch.where(fires(config.zoom > 0), uniform(1 - config.zoom, 1 + config.zoom), 1.0)
        gamma = torch.where(fires(config.gamma > 0), uniform(1 / (1 + config.gamma), 1 + config.gamma), 1.0)
        scale = torch.where(fires(config.intensity > 0), 1 + uniform(-config.intensity, config.intensity), 1.0)
        shift = torch.where(fires(config.intensity > 0), uniform(-config.intensity, config.intensity), 0.0)
        return cls(flip, angle, zoom, gamma, scale, shift)

    def affines(self) -> torch.Tensor:
        """B x 2 x 3 ``affine_grid`` matrices: output → input coordinates of zoom(rotate(flip(image)))."""
        cos, sin = torch.cos(self.angle), torch.sin(self.angle)
        mirror = torch.where(self.flip, -1.0, 1.0)
        # Undo the zoom, then the rotation (R(-angle)), then the flip (x -> -x): columns of x scale by mirror.
        linear = torch.stack([torch.stack([cos * mirror, sin * mirror], -1),
                              torch.stack([-sin, cos], -1)], -2) / self.zoom[:, None, None]
        return torch.cat([linear, torch.zeros(len(self.flip), 2, 1, dtype=linear.dtype)], dim=2)

    def moves(self) -> torch.Tensor:
        """Bool B: slices whose geometry changes (only those are resampled)."""
        return self.flip | (self.angle != 0) | (self.zoom != 1)


@torch.no_grad()
def augment_batch(
    params: BatchParameters, images: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """images: float B x 1 x S x S in [0, 1]; labels: int B x S x S (or None) → both augmented by ``params``,
    on their device (new tensors; the inputs are not modified). Labels keep their dtype and values."""
    from monai.data import set_track_meta
    from monai.transforms import AdjustContrast

    set_track_meta(False)  # plain tensors out, as in samadapt.data.augment
    images = images.clone()
    labels = None if labels is None else labels.clone()
    moved = params.moves().nonzero().squeeze(1).tolist()
    if moved:
        theta = params.affines()[moved].to(images.device, images.dtype)
        grid = F.affine_grid(theta, [len(moved), *images.shape[1:]], align_corners=False)
        images[moved] = F.grid_sample(images[moved], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if labels is not None:
            warped = F.grid_sample(labels[moved, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                                   align_corners=False)
            labels[moved] = warped[:, 0].round().to(labels.dtype)
    for index in (params.gamma != 1).nonzero().squeeze(1).tolist():
        images[index] = AdjustContrast(float(params.gamma[index]))(images[index])
    scale = params.scale.to(images.device, images.dtype).view(-1, 1, 1, 1)
    shift = params.shift.to(images.device, images.dtype).view(-1, 1, 1, 1)
    return (images * scale + shift).clamp_(0.0, 1.0), labels
