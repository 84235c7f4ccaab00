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

    With ``grad_checkpointing`` set, the encoder in training mode and autograd on, each encoder block runs
    under activation checkpointing: its activations are recomputed in the backward pass instead of stored,
    trading ~1/3 more compute for memory. Otherwise the encoder is simply called. The encoder's forward is
    written out block by block here (segment_anything's ``ImageEncoderViT.forward``; for MobileSAM's
    TinyViT of ``vit_t`` / ``vit_t_lite``, the any-size ``forward_features`` of
    :mod:`samadapt.models.registry`), so no class is modified: forward hooks on blocks (bottleneck
    adapters) and peft LoRA layers inside them run, and are recomputed, as usual.

    ``use_reentrant=False``, not TinyViT's own ``use_checkpoint`` switch (reentrant ``checkpoint(blk, x)``):
    the reentrant variant only back-propagates into a block when its input tensor requires grad, which a
    frozen stem (encoder=lora/adapter) never gives — LoRA and adapters inside would get no gradient.
    """
    if not (grad_checkpointing and image_encoder.training and torch.is_grad_enabled()):
        return image_encoder(images)
    if not isinstance(image_encoder, ImageEncoderViT):
        return _tiny_vit_recomputed(image_encoder, images)
    x = image_encoder.patch_embed(images)  # B x S/16 x S/16 x C
    if image_encoder.pos_embed is not None:
        x = x + image_encoder.pos_embed
    for block in image_encoder.blocks:
        x = _checkpointed(block, x)
    return image_encoder.neck(x.permute(0, 3, 1, 2))


def _tiny_vit_recomputed(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MobileSAM's TinyViT (``layers`` of ``ConvLayer``/``BasicLayer``: blocks, then an optional patch
    merging) with every MBConv / TinyViTBlock checkpointed: B x 3 x S x S → B x 256 x g x g."""
    x = encoder.patch_embed(images)  # B x C x S' x S' (S' = S/4; S for the stride-1 stem of vit_t_lite)
    for layer in encoder.layers:
        for block in layer.blocks:
            x = _checkpointed(block, x)
        if layer.downsample is not None:  # patch merging: cheap next to the blocks, kept stored
            x = layer.downsample(x)
    grid_h, grid_w = encoder.layers[-1].input_resolution  # tokens B x g*g x C, as in forward_features
    return encoder.neck(x.view(x.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2))


def _checkpointed(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` with its activations recomputed in backward. TinyViT's BatchNorm layers are in eval mode
    wherever this runs (``SamSegmenter.train``, SimMIM): in training mode the recomputation would count each
    batch in their running statistics twice."""
    return checkpoint(block, x, use_reentrant=False)
