"""Memory-bounded global attention for SAM's plain-ViT encoders.

segment_anything's ``Attention`` materialises (B * heads) x N x N logits, their sum with the decomposed
relative-position bias, the softmax and, in training, a gradient of each: for a global block of vit_b at
1024 px (N = 4096 tokens, 12 heads) that is 0.75 GiB per tensor and ≈ 3 GiB while one block runs backward —
the peak of a grad-checkpointed ViT-B 1024 fine-tuning step. :class:`ChunkedAttention` computes the same
function ``chunk`` query rows at a time; while autograd records, each chunk runs under activation
checkpointing, so only one chunk's maps (N x chunk instead of N x N) exist at once, forward or backward,
for one more recompute of the attention core.

It wraps, it does not modify: the module holds the wrapped ``Attention``'s own ``qkv``, ``proj``,
``rel_pos_h`` and ``rel_pos_w`` under the same names, so state-dict keys (official checkpoints), peft LoRA
targets (``blocks.N.attn.qkv``) and the MAE's sparse global attention see SAM's layout. With at most
``chunk`` tokens (vit_b up to 512 px) it runs SAM's operations in SAM's order: bit-identical outputs.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024  # query rows per chunk: vit_b 1024 px → 4 chunks of 12 x 1024 x 4096 fp32 (192 MiB)


class ChunkedAttention(nn.Module):
    """SAM's multi-head attention with decomposed rel-pos bias, over query chunks.

    Args:
        attention: the segment_anything ``Attention`` whose parameters this module takes over.
        chunk: query rows per chunk.
    """

    def __init__(self, attention: Attention, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        self.num_heads, self.scale, self.use_rel_pos = attention.num_heads, attention.scale, attention.use_rel_pos
        self.qkv, self.proj = attention.qkv, attention.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attention.rel_pos_h, attention.rel_pos_w
        self.chunk = chunk

    def forward(self, x: Tensor) -> Tensor:
        """x: B x H x W x C → B x H x W x C."""
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)  # each (B * heads) x N x d
        rel_h = rel_w = None
        if self.use_rel_pos:  # (B * heads) x N x H and x W: the bias of every query row, without the N x N sum
            grid_q = q.reshape(-1, height, width, q.shape[-1])
            rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, get_rel_pos(height, height, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, get_rel_pos(width, width, self.rel_pos_w))
            rel_h, rel_w = rel_h.reshape(-1, tokens, height), rel_w.reshape(-1, tokens, width)
        recompute = torch.is_grad_enabled() and tokens > self.chunk
        outputs = []
        for start in range(0, tokens, self.chunk):
            rows = slice(start, start + self.chunk)
            args = (
                q[:, rows],
                k,
                v,
                None if rel_h is None else rel_h[:, rows],
                None if rel_w is None else rel_w[:, rows],
                height,
                width,
                self.scale,
            )
            outputs.append(checkpoint(_attend, *args, use_reentrant=False) if recompute else _attend(*args))
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        attended = attended.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(attended.reshape(batch, height, width, -1))


def _attend(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor | None, rel_w: Tensor | None, height: int, width: int, scale: float
) -> Tensor:
    """q: b x n x d query rows, k/v: b x N x d, rel_h: b x n x H, rel_w: b x n x W → b x n x d."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_h is not None:
        rows = attn.shape[1]
        attn = (attn.view(-1, rows, height, width) + rel_h[:, :, :, None] + rel_w[:, :, None, :]).view(
            -1, rows, height * width
        )
    return attn.softmax(dim=-1) @ v


def use_chunked_global_attention(encoder: ImageEncoderViT, chunk: int = DEFAULT_CHUNK) -> ImageEncoderViT:
    """Give ``encoder``'s global-attention blocks (window size 0) a :class:`ChunkedAttention`; in place."""
    for block in encoder.blocks:
        if block.window_size == 0 and isinstance(block.attn, Attention):
            block.attn = ChunkedAttention(block.attn, chunk)
    return encoder
