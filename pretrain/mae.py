"""Masked image modelling on SAM's own image encoder (MAE / SimMIM), with a throw-away decoder.

``MaskedAutoencoderSAM`` holds ``sam.image_encoder`` itself (the same module object), runs its patch
embedding, absolute position embedding and blocks with their own weights, and predicts the pixels (or the
starting encoder's features, ``target``) of the masked 16 x 16 patches from the blocks' output through a
light decoder. Training therefore updates SAM's
encoder in place; export is ``sam.image_encoder.state_dict()`` and the decoder is discarded.

The decoder reads the last block's tokens (B x N x C), *before* the neck: the neck's 3 x 3 conv would mix
kept and dropped windows and only matters for SAM's prompt decoder, so it is neither run nor trained here
(its weights stay as loaded; under DDP it is an unused parameter — freeze it or use
``find_unused_parameters=True``).

Variants:
- ``"drop"`` (MAE, window-aligned units as in Hiera): whole windows of the padded grid are masked
  (``masking.WindowLayout``) and dropped; windowed blocks run on the kept windows only, global blocks
  attend over the kept tokens with SAM's rel-pos bias gathered at their (row, col)
  (``sparse_blocks``). Fewer tokens in global blocks than a full-grid forward sees: the MAE trade-off.
  Coarse: vit_tiny at 256 px has 4 windows, so 75 % masking paints three quadrants from one.
- ``"patch_drop"`` (MAE with single 16-px patches as units, any ratio): every window keeps the same
  fraction of its patches (UM-MAE's uniform masking, ``masking.random_patch_mask``) and masked patches are
  dropped in *every* block: windowed blocks attend inside each window over its visible tokens (plus SAM's
  zero padding) with the rel-pos bias gathered at their positions, global blocks over all visible tokens.
  Why this design rather than free random patches with ragged windows: equal counts keep the kept tokens a
  dense ``B x U x K x C`` tensor (no per-step shapes, no per-window loops, a fixed cost per step), and the
  mask stays spatially even, which UM-MAE found as good as random for windowed/pyramid ViTs; the one
  constraint (each window sees a fraction ``1 - mask_ratio`` of itself) is weaker than ``drop``'s.
- ``"mask_token"`` (SimMIM): single random patches are masked; their patch embeddings are replaced by a
  learned token before the position embedding and every block sees the full grid.

Targets (``target``): ``"pixels"`` (MAE's per-patch pixels), ``"features"`` (EfficientSAM's SAMI, for
continuing a *pretrained* encoder without erasing it: the decoder predicts, at the masked patches, the
output of a frozen copy of the starting encoder — its neck, the B x 256 x G x G embedding SAM's mask
decoder reads — run once per batch on the full image under no_grad) or ``"both"`` (pixel loss +
``feature_weight`` x feature loss; one decoder, two linear heads). Feature targets are normalised per
token (layer norm without affine, as ``norm_pix_loss`` does per patch) so the two losses share a scale.

From lightly: ``random_token_mask`` (drop: windows, mask_token: patches; patch_drop draws the same argsort of
uniform noise per window, with a count per window that lightly's flat masks cannot express), ``mask_at_index``,
``get_at_index``/``set_at_index`` (gather/scatter of kept windows and patches), ``patchify``/``unpatchify``,
``normalize_mean_var`` (per-patch targets), and the decoder ``MaskedVisionTransformerDecoderTIMM`` (mask
token, fixed 2D sine-cosine positions, timm blocks; the successor of the deprecated ``MAEDecoderTIMM``).
Glue written here, because lightly assumes a class token and a flat sequence: no class token
(``num_prefix_tokens=0``), the 2D window layout with SAM's padding, running SAM's blocks on kept windows or
patches, and the relative-position gather for sparse attention.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, get_args

import torch
from lightly.models.modules.masked_vision_transformer_decoder_timm import MaskedVisionTransformerDecoderTIMM
from lightly.models.modules.masked_vision_transformer_timm import init_weights
from lightly.models.utils import (
    get_at_index,
    mask_at_index,
    normalize_mean_var,
    patchify,
    random_token_mask,
    set_at_index,
    unpatchify,
)
from segment_anything.modeling import ImageEncoderViT
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from samadapt.errors import UserError
from samadapt.pretrain.config import DEFAULT_VARIANT, TINY_VIT_VARIANT, Target, Variant
from samadapt.pretrain.masking import WindowLayout, patch_mask_from_indices
from samadapt.pretrain.sparse_blocks import global_block, patch_windowed_block, windowed_block

VARIANTS: tuple[str, ...] = tuple(v for v in get_args(Variant) if v != TINY_VIT_VARIANT)  # plain-ViT variants
TARGETS: tuple[str, ...] = get_args(Target)
DROPPING = ("drop", "patch_drop")  # variants whose encoder never sees the masked tokens


class MAEOutput(NamedTuple):
    """loss: scalar; pred: B x N x (p * p * 3) per-patch pixels (normalised per patch if norm_pix_loss), None
    for target=features; mask: float B x N, 1 = masked (N = (S / p)^2 patches, row-major); parts: the loss
    of each target (``pixels``, ``features``), scalars."""

    loss: Tensor
    pred: Tensor | None
    mask: Tensor
    parts: dict[str, Tensor]


def mae_loss(pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix_loss: bool = True) -> Tensor:
    """Mean squared error over the masked patches only.

    Args:
        pred: B x N x (p * p * 3); images: B x 3 x S x S (pixel-normalised); mask: B x N, 1 = masked.
        norm_pix_loss: targets are each patch's pixels normalised to zero mean and unit variance (MAE).
    Returns: scalar; 0 if nothing is masked.
    """
    target = patchify(images, patch_size)
    if norm_pix_loss:
        target = normalize_mean_var(target, dim=-1)
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def feature_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error to per-token normalised teacher features over the masked tokens only.

    Args: pred, target: B x N x D (target = the frozen encoder's features per patch); mask: B x N, 1 = masked.
    Returns: scalar; 0 if nothing is masked.
    """
    target = F.layer_norm(target, target.shape[-1:], eps=1e-6)
    per_token = ((pred - target) ** 2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class MaskedObjective(nn.Module):
    """What every masked-image objective here shares: the encoder it trains in place (``self.encoder``), the mask
    ratio, the loss target and, for a feature target, the frozen starting encoder (``self.teacher``).

    Args: see :class:`MaskedAutoencoderSAM`; subclasses check the encoder's type before calling this.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float, norm_pix_loss: bool, grad_checkpointing: bool,
                 target: str, feature_weight: float) -> None:
        super().__init__()
        if target not in TARGETS:
            raise UserError(f"target={target!r} is not known — choose one of {', '.join(TARGETS)}")
        if not 0 <= mask_ratio < 1:
            raise UserError(f"mask_ratio={mask_ratio} must be in [0, 1), e.g. 0.75")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = grad_checkpointing
        self.target = target
        self.feature_weight = feature_weight
        if target != "pixels":
            # The starting encoder, frozen: its features are the knowledge to keep (never trained, not exported).
            self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval()

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> Tensor:
        """The frozen starting encoder on the full encoder inputs (B x 3 x S x S) → B x N x D (D = neck channels)."""
        return self.teacher(images).flatten(2).transpose(1, 2)

    def _run(self, function, *args):
        """``function(*args)``, recomputed in backward instead of stored when ``grad_checkpointing`` is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def total_loss(self, parts: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the per-target losses ``parts`` (``feature_weight`` scales features for "both")."""
        weights = {"pixels": 1.0, "features": self.feature_weight if self.target == "both" else 1.0}
        return sum(weights[name] * loss for name, loss in parts.items())


class MaskedAutoencoderSAM(MaskedObjective):
    """MAE/SimMIM around a segment_anything ``ImageEncoderViT`` (kept as ``self.encoder``, trained in place).

    Args:
        encoder: the SAM image encoder to train; its ``img_size`` fixes the input size S.
        mask_ratio: fraction of windows ("drop"), of each window's patches ("patch_drop") or of the patches
            ("mask_token") to mask, in [0, 1).
        decoder_dim, decoder_depth, decoder_heads: width, blocks and heads of the throw-away decoder.
        variant: "drop" (window-aligned token dropping), "patch_drop" (patch token dropping, equal counts per
            window) or "mask_token" (SimMIM-style full grid).
        target: "pixels", "features" (a frozen copy of ``encoder`` as it is now, kept as ``self.teacher``)
            or "both"; feature_weight: the feature loss's weight for "both".
        norm_pix_loss: per-patch normalised pixel targets.
        grad_checkpointing: recompute each encoder block in the backward pass (saves activation memory).
    """

    def __init__(
        self,
        encoder: ImageEncoderViT,
        mask_ratio: float = 0.75,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        variant: str = DEFAULT_VARIANT,
        norm_pix_loss: bool = True,
        grad_checkpointing: bool = False,
        target: str = "pixels",
        feature_weight: float = 1.0,
    ) -> None:
        if not isinstance(encoder, ImageEncoderViT):
            raise UserError(
                f"variant={variant} needs a plain-ViT SAM encoder (vit_b, vit_l, vit_h, vit_tiny), got "
                f"{type(encoder).__name__} — TinyViT encoders (vit_t, vit_t_lite) take variant=simmim"
            )
        if variant not in VARIANTS:
            raise UserError(f"variant={variant!r} is not known — choose one of {', '.join(VARIANTS)}")
        super().__init__(encoder, mask_ratio, norm_pix_loss, grad_checkpointing, target, feature_weight)
        self.variant = variant
        self.patch_size = encoder.patch_embed.proj.kernel_size[0]
        self.image_size = encoder.img_size
        self.grid_size = self.image_size // self.patch_size
        self.num_patches = self.grid_size**2
        embed_dim = encoder.patch_embed.proj.out_channels

        if variant in DROPPING:
            self.layout = self._window_layout(encoder, variant)
            if variant == "drop" and self.layout.num_kept_units(mask_ratio) < 1:
                raise UserError(
                    f"mask_ratio={mask_ratio} masks all {self.layout.num_units} windows at image_size="
                    f"{self.image_size} — lower mask_ratio or use variant=patch_drop"
                )
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)

        # SAM's blocks end without a norm (the neck has it), so the decoder normalises its input itself.
        self.decoder_embed = nn.Sequential(nn.LayerNorm(embed_dim, eps=1e-6), nn.Linear(embed_dim, decoder_dim))
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches, embed_dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
            num_prefix_tokens=0,
        )
        if variant == "mask_token":
            # The encoder already carries masked positions; the decoder's own mask token stays unused.
            self.decoder.mask_token.requires_grad_(False)
        heads = {"pixels": self.patch_size**2 * 3, "features": encoder.neck[0].out_channels}
        self.heads = nn.ModuleDict({name: nn.Linear(decoder_dim, width) for name, width in heads.items()
                                    if target in (name, "both")})
        self.decoder_embed.apply(init_weights)
        self.heads.apply(init_weights)

    @staticmethod
    def _window_layout(encoder: ImageEncoderViT, variant: str) -> WindowLayout:
        window_sizes = {block.window_size for block in encoder.blocks if block.window_size > 0}
        if len(window_sizes) != 1:
            raise UserError(
                f"variant={variant} needs windowed blocks of one window size, the encoder has "
                f"{sorted(window_sizes)} — use variant=mask_token"
            )
        return WindowLayout(encoder.img_size // encoder.patch_embed.proj.kernel_size[0], window_sizes.pop())

    def forward(self, images: Tensor) -> MAEOutput:
        """images: B x 3 x S x S pixel-normalised → MAEOutput (masks drawn from torch's global RNG)."""
        tokens, mask = self.encode(images)
        decoded = self.decode(tokens, mask if self.variant in DROPPING else None)
        parts, pred = {}, None
        if "pixels" in self.heads:
            pred = self.heads["pixels"](decoded)
            parts["pixels"] = mae_loss(pred, images, mask, self.patch_size, self.norm_pix_loss)
        if "features" in self.heads:
            parts["features"] = feature_loss(self.heads["features"](decoded), self.teacher_features(images), mask)
        return MAEOutput(self.total_loss(parts), pred, mask, parts)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Draw a mask and run the encoder's blocks.

        Returns: tokens B x N x C, the last block's output (zeros at dropped patches for "drop" and
        "patch_drop"), and mask float B x N (1 = masked).
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be B x 3 x {self.image_size} x {self.image_size}, got {tuple(images.shape)}")
        encoders = {"drop": self._encode_drop, "patch_drop": self._encode_patch_drop,
                    "mask_token": self._encode_mask_token}
        return encoders[self.variant](images)

    def decode(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encoder tokens B x N x C → the decoder's tokens B x N x decoder_dim (read by ``self.heads``).

        mask: B x N (1 = masked) to replace by the decoder's mask token (dropped tokens), or None.
        """
        return self.decoder(self.decoder_embed(tokens), mask=None if mask is None else mask.bool())

    def _encode_mask_token(self, images: Tensor) -> tuple[Tensor, Tensor]:
        encoder = self.encoder
        x = encoder.patch_embed(images)  # B x G x G x C
        batch, grid, _, channels = x.shape
        _, idx_mask = random_token_mask(
            (batch, self.num_patches), self.mask_ratio, mask_class_token=True, device=images.device
        )
        # SimMIM: the mask token replaces the patch embedding; the position embedding is added after.
        x = mask_at_index(x.reshape(batch, -1, channels), idx_mask, self.mask_token.to(x.dtype))
        x = x.view(batch, grid, grid, channels)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = self._run(block, x)
        return x.reshape(batch, -1, channels), patch_mask_from_indices(idx_mask, self.num_patches)

    def _encode_drop(self, images: Tensor) -> tuple[Tensor, Tensor]:
        encoder, layout = self.encoder, self.layout
        x = encoder.patch_embed(images)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        batch, _, _, channels = x.shape
        idx_keep, idx_mask = layout.random_unit_mask(batch, self.mask_ratio, images.device)
        kept = get_at_index(layout.partition(x).flatten(2), idx_keep)  # B x K x (T * C)
        kept = kept.view(batch, idx_keep.shape[1], layout.tokens_per_unit, channels)
        valid, rows, cols = (t.to(images.device)[idx_keep] for t in (layout.valid, layout.rows, layout.cols))
        for block in encoder.blocks:
            if block.window_size > 0:
                kept = self._run(windowed_block, block, kept, valid)
            else:
                kept = self._run(global_block, block, kept, valid, rows, cols, self.grid_size)
        # Scatter the kept windows back onto the grid; dropped windows become zeros (the decoder
        # replaces them by its mask token).
        windows = set_at_index(
            x.new_zeros(batch, layout.num_units, layout.tokens_per_unit * channels), idx_keep, kept.flatten(2)
        )
        grid = layout.unpartition(windows.view(batch, layout.num_units, layout.tokens_per_unit, channels))
        return grid.reshape(batch, -1, channels), layout.patch_mask(idx_mask)

    def _encode_patch_drop(self, images: Tensor) -> tuple[Tensor, Tensor]:
        encoder, layout, device = self.encoder, self.layout, images.device
        x = encoder.patch_embed(images)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        batch, _, _, channels = x.shape
        idx, slot_valid = layout.random_patch_mask(batch, self.mask_ratio, device)  # B x U x K, U x K
        units, kept_per_unit = idx.shape[1:]
        windows = layout.partition(x).flatten(0, 1)  # (B U) x T x C
        kept = get_at_index(windows, idx.flatten(0, 1)).view(batch, units, kept_per_unit, channels)
        valid = slot_valid.expand(batch, -1, -1)
        rows, cols = (t.to(device).expand(batch, -1, -1).gather(2, idx) for t in (layout.rows, layout.cols))
        w = layout.window_size
        padding, padding_valid = (t.to(device) for t in layout.padding_positions())
        for block in encoder.blocks:
            if block.window_size > 0:
                kept = self._run(patch_windowed_block, block, kept, valid, idx // w, idx % w, padding, padding_valid)
            else:
                kept = self._run(global_block, block, kept, valid, rows, cols, self.grid_size)
        # Scatter the visible tokens onto the grid; ignored slots go to an extra position N that is cut off.
        flat = (rows * self.grid_size + cols).masked_fill(~valid, self.num_patches).flatten(1)  # B x (U K)
        grid = set_at_index(x.new_zeros(batch, self.num_patches + 1, channels), flat, kept.flatten(1, 2))
        mask = torch.ones(batch, self.num_patches + 1, device=device).scatter(1, flat, 0.0)
        return grid[:, :-1], mask[:, :-1]

    @torch.no_grad()
    def reconstruct(self, images: Tensor, output: MAEOutput) -> tuple[Tensor, Tensor | None]:
        """Preview images for ``output`` of ``forward(images)``.

        Returns (masked_images, reconstructed_images), both B x 3 x S x S in the intensity space of
        ``images`` (per-patch normalisation undone with each true patch's mean/std, as in MAE's demo):
        masked patches are 0 in the first, and predicted (visible patches copied) in the second, which is
        None for target=features (nothing predicts pixels).
        """
        target = patchify(images, self.patch_size)
        mask = output.mask.unsqueeze(-1).to(target.dtype)
        visible = target * (1 - mask)
        masked = unpatchify(visible, self.patch_size, images.shape[1])
        if output.pred is None:
            return masked, None
        pred = output.pred.to(target.dtype)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        return masked, unpatchify(visible + pred * mask, self.patch_size, images.shape[1])
