"""SimMIM (Xie et al. 2022) on SAM's hierarchical TinyViT encoders: ``vit_t`` (MobileSAM) and ``vit_t_lite``
(LiteMedSAM), ``variant=simmim``.

TinyViT is a conv stem, a conv stage (MBConv) and three attention stages whose patch mergings (3 x 3 convs)
halve the grid twice: vit_t's stem has stride 4 and its output stride 16 (256 px → 64 x 64 stem cells → a
16 x 16 final grid), vit_t_lite's 1 x 1 stem stride 1 and its output stride 4 (256 px → 256 x 256 → 64 x 64).
Its convolutions need the whole grid, so masked tokens cannot be dropped as MAE does; SimMIM's recipe is made
for that: the stem's embeddings of masked units are replaced by one learned mask token, the full encoder runs,
and a linear head (1 x 1 conv to ``stride^2 * 3`` channels + pixel shuffle) predicts every pixel from the final
grid, with an L1 loss on the masked pixels only.

Mask units are 16 x 16 px (``MASK_UNIT_PX``): SAM's patch, so mask_ratio means what it means for the ViT
variants; a whole number of final cells for both archs (1 for vit_t, 4 x 4 for vit_t_lite), so no final
token straddles a unit border; 4 x 4 stem cells for both. Not vit_t_lite's 4-px final stride: SimMIM found
units much smaller than the output stride (Swin: 32 px) worse, since a 4-px hole is filled by interpolating
its neighbours. The input pixels of masked units are zeroed too before the stem: vit_t's 3 x 3, stride-2
stem convs would otherwise let visible cells at a unit border read up to 3 px of the masked unit.

Targets are the encoder's own input (``input_norm`` of the arch: SAM mean/std for vit_t, per-slice min-max
for vit_t_lite), per 16-px unit normalised to zero mean and unit variance when ``norm_pix_loss`` (as MAE; Xie
et al. regress raw pixels — norm_pix_loss=false). ``target=features``/``both``: a 1 x 1 conv predicts, at the
final cells of masked units, the neck output of a frozen copy of the starting encoder (EfficientSAM's SAMI, as
:class:`~samadapt.pretrain.mae.MaskedAutoencoderSAM` does); one teacher forward per batch under no_grad.

BatchNorm stays in eval mode (running statistics frozen, affine weights trained): batches of 1-8 slices give
noisy statistics, and mask tokens would pull the running mean/var away from those that fine-tuning and
inference normalise with. The neck is neither run nor trained (as for MAE); the head is discarded at export.
"""

from __future__ import annotations

import torch
from lightly.models.utils import normalize_mean_var, patchify, random_token_mask
from torch import Tensor, nn

from samadapt.errors import UserError
from samadapt.models.normalisation import SAM_PIXEL_MEAN, SAM_PIXEL_STD, to_model_input
from samadapt.models.registry import tiny_vit_module
from samadapt.pretrain.config import Target
from samadapt.pretrain.mae import MAEOutput, MaskedAutoencoderSAM, MaskedObjective, feature_loss
from samadapt.pretrain.masking import patch_mask_from_indices

MASK_UNIT_PX = 16


def l1_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix_loss: bool) -> Tensor:
    """Mean absolute error over the masked units only (SimMIM's loss).

    Args: pred, target: B x U x (u * u * 3) per-unit pixels (target in the encoder's input space); mask:
        B x U, 1 = masked; norm_pix_loss: targets normalised per unit (MAE).
    Returns: scalar; 0 if nothing is masked.
    """
    if norm_pix_loss:
        target = normalize_mean_var(target, dim=-1)
    per_unit = (pred - target).abs().mean(dim=-1)
    return (per_unit * mask).sum() / mask.sum().clamp(min=1)


class SimMIMTinyViT(MaskedObjective):
    """SimMIM around a mobile_sam ``TinyViT`` image encoder (kept as ``self.encoder``, trained in place).

    Args:
        encoder: the SAM image encoder (vit_t or vit_t_lite); its ``img_size`` fixes the input size S.
        mask_ratio: fraction of the ``U = (S / 16)^2`` units to mask, in [0, 1) (``U - floor(U * (1 - ratio))``
            units, lightly's rounding as for the ViT variants).
        input_norm: the encoder's input normalisation (``registry.input_norm(arch)``: ``sam`` or ``minmax``).
        norm_pix_loss: per-unit normalised pixel targets.
        grad_checkpointing: recompute each TinyViT block in the backward pass.
        target: ``pixels``, ``features`` (a frozen copy of ``encoder`` as ``self.teacher``) or ``both``;
            feature_weight: the feature loss's weight for ``both``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.75,
        input_norm: str = "sam",
        norm_pix_loss: bool = True,
        grad_checkpointing: bool = False,
        target: Target = "pixels",
        feature_weight: float = 1.0,
    ) -> None:
        if not isinstance(encoder, tiny_vit_module().TinyViT):
            raise UserError(f"variant=simmim needs a TinyViT encoder (vit_t, vit_t_lite), got {type(encoder).__name__}"
                            " — choose one of those archs or another variant")
        super().__init__(encoder, mask_ratio, norm_pix_loss, grad_checkpointing, target, feature_weight)
        self.input_norm = input_norm
        self.image_size = encoder.img_size
        self.stem_grid = encoder.patch_embed.patches_resolution[0]
        self.grid_size = encoder.layers[-1].input_resolution[0]
        self.stride = self.image_size // self.grid_size  # input px per final cell: 16 (vit_t), 4 (vit_t_lite)
        self.patch_size = max(MASK_UNIT_PX, self.stride)  # px per mask unit (``patch_size``: MAE's preview maths)
        if self.image_size % self.patch_size:
            raise UserError(f"image_size={self.image_size} must be a multiple of the {self.patch_size}-px mask unit")
        self.units_per_side = self.image_size // self.patch_size
        self.num_units = self.units_per_side**2
        self.mask_token = nn.Parameter(torch.zeros(1, encoder.layers[0].dim, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        final_dim = encoder.layers[-1].dim
        # The last stage ends without a norm (the neck has it), so the head normalises its input itself.
        self.head_norm = nn.LayerNorm(final_dim, eps=1e-6)
        heads = {"pixels": nn.Sequential(nn.Conv2d(final_dim, self.stride**2 * 3, 1), nn.PixelShuffle(self.stride)),
                 "features": nn.Conv2d(final_dim, encoder.neck[0].out_channels, 1)}
        self.heads = nn.ModuleDict({name: head for name, head in heads.items() if target in (name, "both")})

    def train(self, mode: bool = True) -> SimMIMTinyViT:
        """As ``nn.Module.train``, but BatchNorm layers and the teacher stay in eval mode (see module doc)."""
        super().train(mode)
        for module in self.encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        if hasattr(self, "teacher"):
            self.teacher.eval()  # also refreshes its cached attention biases (TinyViT's ``ab``)
        return self

    def encoder_input(self, images: Tensor) -> Tensor:
        """SAM-normalised images B x 3 x S x S (what ``pretrain.stage.masked_image_loss`` feeds every masked
        model) → the encoder's own input B x 3 x S x S (``input_norm``); to_sam_input is undone exactly."""
        if self.input_norm == "sam":
            return images
        slices = (images[:, :1] * SAM_PIXEL_STD[0] + SAM_PIXEL_MEAN[0]) / 255.0  # B x 1 x S x S in [0, 1]
        return to_model_input(slices, self.input_norm)

    def random_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """Float B x U unit mask (1 = masked, U row-major over the S/16 x S/16 units), from torch's global RNG."""
        _, idx_mask = random_token_mask((batch_size, self.num_units), self.mask_ratio, mask_class_token=True,
                                        device=device)
        return patch_mask_from_indices(idx_mask, self.num_units)

    def unit_mask_grid(self, mask: Tensor, side: int) -> Tensor:
        """B x U unit mask → B x 1 x side x side (each unit repeated over its side / units_per_side cells)."""
        cells = side // self.units_per_side
        grid = mask.view(-1, 1, self.units_per_side, self.units_per_side)
        return grid.repeat_interleave(cells, dim=2).repeat_interleave(cells, dim=3)

    def forward(self, images: Tensor) -> MAEOutput:
        """images: B x 3 x S x S SAM-normalised → MAEOutput (pred B x U x (16 * 16 * 3) in the encoder's input
        space, per unit normalised if norm_pix_loss; mask B x U; None pred for target=features)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be B x 3 x {self.image_size} x {self.image_size}, got {tuple(images.shape)}")
        x = self.encoder_input(images)
        mask = self.random_mask(x.shape[0], x.device)
        features = self.encode(x, mask)  # B x C x g x g
        parts, pred = {}, None
        if "pixels" in self.heads:
            pred = patchify(self.heads["pixels"](features), self.patch_size)
            parts["pixels"] = l1_loss(pred, patchify(x, self.patch_size), mask, self.norm_pix_loss)
        if "features" in self.heads:
            cell_mask = self.unit_mask_grid(mask, self.grid_size).flatten(1)  # B x N final cells
            predicted = self.heads["features"](features).flatten(2).transpose(1, 2)
            parts["features"] = feature_loss(predicted, self.teacher_features(x), cell_mask)
        return MAEOutput(self.total_loss(parts), pred, mask, parts)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encoder inputs B x 3 x S x S and unit mask B x U → the last stage's output, normalised,
        B x C x g x g (g = S / stride), every stem cell of a masked unit replaced by the mask token."""
        encoder = self.encoder
        x = x * (1 - self.unit_mask_grid(mask, self.image_size)).to(x.dtype)
        stem = encoder.patch_embed(x)  # B x C0 x S/s x S/s
        cell_mask = self.unit_mask_grid(mask, self.stem_grid).to(stem.dtype)
        tokens = stem * (1 - cell_mask) + self.mask_token.to(stem.dtype) * cell_mask
        # TinyViT's layer forward, block by block so that grad_checkpointing can recompute each.
        for layer in encoder.layers:
            for block in layer.blocks:
                tokens = self._run(block, tokens)
            if layer.downsample is not None:
                tokens = self._run(layer.downsample, tokens)
        tokens = self.head_norm(tokens)  # B x N x C
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid_size, self.grid_size)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, output: MAEOutput) -> tuple[Tensor, Tensor | None]:
        """Preview images for ``output`` of ``forward(images)``: (masked, reconstructed), B x 3 x S x S in the
        encoder's input space — MAE's preview maths (:meth:`MaskedAutoencoderSAM.reconstruct`) on 16-px units."""
        return MaskedAutoencoderSAM.reconstruct(self, self.encoder_input(images), output)
