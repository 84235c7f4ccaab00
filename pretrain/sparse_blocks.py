"""Run SAM's own ViT blocks on the kept windows or patches only (glue around each block's weights, no patching).

A segment_anything ``Block`` is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; windowed blocks pad the
normalised grid with zeros, attend inside each ``w x w`` window and crop the padding again; global blocks
attend over the whole ``G x G`` grid with decomposed relative positions (``rel_pos_h``/``rel_pos_w``).
``variant=drop`` keeps whole windows ``B x K x T x C`` (``T = w * w``, padding positions included):

- windowed blocks call the block's own ``attn`` on the kept windows, after zeroing the padding positions
  of ``norm1``'s output exactly as ``window_partition`` pads — equal to the full-grid block at those
  windows;
- global blocks attend over the ``K * T`` kept tokens with the block's ``qkv``/``proj`` weights, the
  relative-position bias gathered at the tokens' (row, col), and padding positions masked out as keys —
  with every window kept this equals the block's own forward. Padding positions still run as queries
  (their values are never read by a real token) so that all images in a batch keep ``K * T`` tokens.

``variant=patch_drop`` keeps single patches, the same number in every window (``masking.random_patch_mask``),
as ``B x U x K x C``: windowed blocks attend inside each window over its visible tokens and its padding
positions (``patch_windowed_block``), global blocks are ``global_block`` on the ``U * K`` slots. Both go
through one ``sparse_attention``: SAM's attention with the relative-position bias gathered at the tokens'
positions, on the grid the block's tables were made for (the window, or the whole grid).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import Tensor


def windowed_block(block: Block, tokens: Tensor, valid: Tensor) -> Tensor:
    """One windowed ``Block`` on kept windows.

    Args:
        tokens: B x K x T x C kept windows (T = window_size^2, padding positions included).
        valid: bool B x K x T, False at padding positions.
    Returns: B x K x T x C.
    """
    batch, kept, per_unit, channels = tokens.shape
    w = block.window_size
    # SAM pads *after* norm1 with zeros, so padding keys/values come from zero inputs.
    normed = block.norm1(tokens) * valid.unsqueeze(-1).to(tokens.dtype)
    attended = block.attn(normed.reshape(batch * kept, w, w, channels)).view(batch, kept, per_unit, channels)
    tokens = tokens + attended
    return tokens + block.mlp(block.norm2(tokens))


def global_block(block: Block, tokens: Tensor, valid: Tensor, rows: Tensor, cols: Tensor, grid_size: int) -> Tensor:
    """One global-attention ``Block`` on the tokens of the kept windows.

    Args:
        tokens: B x K x T x C kept windows.
        valid: bool B x K x T, False at padding positions (never used as keys).
        rows, cols: long B x K x T, position of each token on the G x G grid.
        grid_size: G, the grid the block's rel-pos tables were made for.
    Returns: B x K x T x C.
    """
    shape = tokens.shape
    flat = tokens.reshape(shape[0], -1, shape[-1])
    attended = sparse_attention(
        block.attn, block.norm1(flat), rows.reshape(shape[0], -1), cols.reshape(shape[0], -1),
        valid.reshape(shape[0], -1), grid_size,
    )
    flat = flat + attended
    flat = flat + block.mlp(block.norm2(flat))
    return flat.view(shape)


def patch_windowed_block(
    block: Block, tokens: Tensor, valid: Tensor, rows: Tensor, cols: Tensor, padding: Tensor, padding_valid: Tensor
) -> Tensor:
    """One windowed ``Block`` on the visible patches of every window (``variant=patch_drop``).

    Each window attends over its own visible tokens and its padding positions (zero inputs in SAM, so
    their key and value are ``qkv``'s bias), with the window's relative-position bias gathered at their
    positions — equal to the full-grid block with the masked tokens removed as keys.

    Args:
        tokens: B x U x K x C visible tokens per window; valid: bool B x U x K (False = ignored slot).
        rows, cols: long B x U x K positions inside the window (0 .. w - 1).
        padding: long U x P padding positions inside each window (0 .. w * w - 1); padding_valid: bool U x P.
    Returns: B x U x K x C.
    """
    batch, units, kept, channels = tokens.shape
    w = block.window_size
    fold = batch * units  # every window of every image is one attention problem
    positions = padding.expand(batch, -1, -1).reshape(fold, -1)
    pad = (positions // w, positions % w, padding_valid.expand(batch, -1, -1).reshape(fold, -1))
    attended = sparse_attention(
        block.attn, block.norm1(tokens).reshape(fold, kept, channels), rows.reshape(fold, kept),
        cols.reshape(fold, kept), valid.reshape(fold, kept), w, pad,
    )
    tokens = tokens + attended.view(tokens.shape)
    return tokens + block.mlp(block.norm2(tokens))


def sparse_attention(
    attn: Attention, x: Tensor, rows: Tensor, cols: Tensor, key_valid: Tensor, size: int,
    padding: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """SAM's ``Attention`` over a subset of the tokens of a size x size grid (the whole grid for global
    blocks, one window for windowed ones: the grid the block's rel-pos tables were made for).

    Args:
        x: B x L x C normalised tokens; rows, cols: long B x L grid positions; key_valid: bool B x L.
        padding: optional (rows, cols, valid) B x P of zero-input positions that act as keys only.
    Returns: B x L x C, for valid tokens equal to the full-grid attention restricted to these keys.
    """
    batch, length, channels = x.shape
    heads = attn.num_heads
    # B x L x 3C → 3 x B x heads x L x head_dim, the order of Attention.forward.
    q, k, v = attn.qkv(x).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    key_rows, key_cols = rows, cols
    if padding is not None:
        pad_rows, pad_cols, pad_valid = padding
        # A zero input's key and value: qkv's bias (zeros without one), the same for every padding position.
        pad_k, pad_v = attn.qkv(x.new_zeros(channels)).view(3, heads, 1, -1)[1:]
        extra = (batch, heads, pad_rows.shape[1], k.shape[-1])
        k, v = torch.cat([k, pad_k.expand(extra)], dim=2), torch.cat([v, pad_v.expand(extra)], dim=2)
        key_rows, key_cols = torch.cat([rows, pad_rows], dim=1), torch.cat([cols, pad_cols], dim=1)
        key_valid = torch.cat([key_valid, pad_valid], dim=1)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # B x heads x L x (L + P)
    if attn.use_rel_pos:
        logits = logits + _rel_pos_bias(q, attn.rel_pos_h, rows, key_rows, size)
        logits = logits + _rel_pos_bias(q, attn.rel_pos_w, cols, key_cols, size)
    logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = logits.softmax(dim=-1) @ v  # B x heads x L x head_dim
    return attn.proj(out.transpose(1, 2).reshape(batch, length, channels))


def _rel_pos_bias(q: Tensor, rel_pos: Tensor, coord: Tensor, key_coord: Tensor, size: int) -> Tensor:
    """Decomposed rel-pos term along one axis: bias[b, h, i, j] = q_i · R[coord_i - key_coord_j].

    q: B x heads x L x head_dim (unscaled, as in ``add_decomposed_rel_pos``); coord: long B x L;
    key_coord: long B x M. Computes q_i against all ``size`` key coordinates (B x heads x L x size), then
    gathers the keys' coordinates — the same two steps as SAM's einsum + broadcast, restricted to the kept tokens.
    """
    table = get_rel_pos(size, size, rel_pos)  # size (query) x size (key) x head_dim
    per_query = torch.einsum("bnlc,blkc->bnlk", q, table[coord])
    batch, heads, length, _ = per_query.shape
    return per_query.gather(-1, key_coord[:, None, None, :].expand(batch, heads, length, key_coord.shape[1]))
