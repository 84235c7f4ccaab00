"""Forward passes through SAM's parts that training needs and segment_anything does not offer."""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT
from torch.utils.checkpoint import checkpoint


def encode_images(
    image_encoder: torch.nn.Module, images: torch.Tensor, grad_checkpointing: bool = False
) -> torch.Tensor:
    """images: B x 3 x S x S, normalised as the encoder expects (``to_model_input``) → image embeddings
    B x 256 x g x g (g = S/16; S/4 for LiteMedSAM's TinyViT).

    For segment_anything's ``ImageEncoderViT`` this is ``ImageEncoderViT.forward`` written out block by
    block, so each block can run under activation checkpointing (``use_reentrant=False``) when
    ``grad_checkpointing`` is set, the encoder is in training mode and autograd is on: activations are
    recomputed in the backward pass instead of stored, trading ~1/3 more compute for memory. The class is
    not modified; hooks on blocks (bottleneck adapters) and peft LoRA layers run as usual. Any other
    encoder (MobileSAM's TinyViT for ``vit_t`` / ``vit_t_lite``) is simply called.
    """
    if not isinstance(image_encoder, ImageEncoderViT):
        return image_encoder(images)
    x = image_encoder.patch_embed(images)  # B x S/16 x S/16 x C
    if image_encoder.pos_embed is not None:
        x = x + image_encoder.pos_embed
    recompute = grad_checkpointing and image_encoder.training and torch.is_grad_enabled()
    for block in image_encoder.blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return image_encoder.neck(x.permute(0, 3, 1, 2))
