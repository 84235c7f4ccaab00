"""Bottleneck adapters for SAM, attached with forward hooks instead of edits to segment_anything.

peft has no bottleneck-adapter method, so this is the one small module of ours. Each adapter is
``x + scale * up(GELU(down(x)))`` with ``up`` zero-initialised: a freshly attached adapter leaves the
model's outputs bit-identical. Adapters sit after every image-encoder block (ViT ``Block`` of
segment_anything, ``TinyViTBlock`` of MobileSAM) and after every ``TwoWayAttentionBlock`` of the mask
decoder (one adapter on the tokens, one on the image tokens). They are registered under the model's
new top-level attribute ``bottleneck_adapters``, so every ``sam.`` key keeps its official name.
"""

from __future__ import annotations

import sys

import torch
from segment_anything.modeling.image_encoder import Block as ViTBlock
from segment_anything.modeling.transformer import TwoWayAttentionBlock
from torch import nn

from samadapt.errors import UserError

ADAPTERS_ATTR = "bottleneck_adapters"


def encoder_blocks(sam: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of SAM's image encoder in forward order, as (name under ``sam.``, module).

    ``ImageEncoderViT`` (vit_b/l/h/tiny): ``image_encoder.blocks.<i>``. MobileSAM's ``TinyViT`` (vit_t):
    ``image_encoder.layers.<s>.blocks.<j>`` of its attention stages (its first stage is convolutional
    and has no attention blocks). Another encoder class is refused, since its block layout is unknown.
    """
    tiny_vit = sys.modules.get("mobile_sam.modeling.tiny_vit_sam")  # imported iff a TinyViT was built
    block_types = (ViTBlock,) + ((tiny_vit.TinyViTBlock,) if tiny_vit else ())
    blocks = [
        (f"image_encoder.{name}", module)
        for name, module in sam.image_encoder.named_modules()
        if isinstance(module, block_types)
    ]
    if not blocks:
        raise UserError(
            f"image encoder {type(sam.image_encoder).__name__}: no ViT/TinyViT blocks found — "
            "lora/adapter strategies support segment_anything ImageEncoderViT and MobileSAM TinyViT; "
            "use encoder=frozen or encoder=full"
        )
    return blocks


def decoder_blocks(sam: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``TwoWayAttentionBlock`` layers of SAM's mask decoder, as (name under ``sam.``, module)."""
    return [
        (f"mask_decoder.transformer.{name}", module)
        for name, module in sam.mask_decoder.transformer.named_modules()
        if isinstance(module, TwoWayAttentionBlock)
    ]


class BottleneckAdapter(nn.Module):
    """``x + scale * up(GELU(down(x)))`` on the last dimension: ... x dim → ... x dim."""

    def __init__(self, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        # Zero up-projection: the adapter starts as the identity, so training starts from the base model.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.up(self.act(self.down(x)))


class TwoWayAdapter(nn.Module):
    """Adapters for both outputs of a ``TwoWayAttentionBlock``: tokens B x N x C, image tokens B x HW x C."""

    def __init__(self, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.tokens = BottleneckAdapter(dim, bottleneck, scale)
        self.image = BottleneckAdapter(dim, bottleneck, scale)

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        queries, keys = outputs
        return self.tokens(queries), self.image(keys)


class SamAdapters(nn.Module):
    """The bottleneck adapters of one model: ``image_encoder.<i>`` / ``mask_decoder.<i>`` per block.

    Holds the hook handles, so :meth:`detach` restores the plain model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.ModuleList()
        self.mask_decoder = nn.ModuleList()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, block: nn.Module, adapter: nn.Module, part: str) -> None:
        """Run ``adapter`` on ``block``'s output at every forward (the block's class is left untouched)."""
        getattr(self, part).append(adapter)
        self._hooks.append(block.register_forward_hook(lambda _module, _inputs, output: adapter(output)))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def add_bottleneck_adapters(
    model: nn.Module, sam: nn.Module, encoder: bool, decoder: bool, bottleneck: int, scale: float
) -> SamAdapters:
    """Attach adapters to ``sam``'s encoder blocks and/or decoder blocks; register them as
    ``model.bottleneck_adapters`` (``model`` is the module holding ``sam``, e.g. the segmenter)."""
    adapters = SamAdapters()
    if encoder:
        for _, block in encoder_blocks(sam):
            # Both block types keep the width of their attention input: ViT B x H x W x C, TinyViT B x L x C.
            adapters.attach(block, BottleneckAdapter(block.attn.qkv.in_features, bottleneck, scale), "image_encoder")
    if decoder:
        for _, block in decoder_blocks(sam):
            adapters.attach(block, TwoWayAdapter(block.self_attn.embedding_dim, bottleneck, scale), "mask_decoder")
    setattr(model, ADAPTERS_ATTR, adapters)
    return adapters
