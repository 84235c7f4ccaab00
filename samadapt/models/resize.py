"""Convert SAM weights between input sizes (e.g. official 1024 px weights used at 256 px).

Only two kinds of tensors of a plain-ViT SAM depend on the input size:

- ``image_encoder.pos_embed``: 1 x g x g x C with g = image_size / 16, resampled bicubically on the grid;
- ``rel_pos_h`` / ``rel_pos_w`` of the *global*-attention blocks: (2g - 1) x head_dim tables, resampled
  linearly along the table (as SAMed / SAM-Med2D do, and as segment_anything's own ``get_rel_pos`` does
  when sizes differ). Windowed blocks' tables depend only on the window size and are kept.

The prompt encoder has no size-dependent weights (its embedding grid is a constructor argument).
MobileSAM's TinyViT (``vit_t``) has no absolute position embedding and its attention biases are per
window, so its weights are the same at every input size.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from samadapt.models.registry import PATCH_SIZE, VIT_SPECS

POS_EMBED = "image_encoder.pos_embed"
_REL_POS = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$")


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resample of an absolute position embedding: 1 x g x g x C → 1 x grid x grid x C."""
    if pos_embed.shape[1] == grid:
        return pos_embed
    channels_first = pos_embed.permute(0, 3, 1, 2).float()
    resized = F.interpolate(channels_first, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resample of a relative-position table along its length: L x C → length x C."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype).contiguous()


def stored_image_size(state_dict: dict[str, torch.Tensor], arch: str) -> int | None:
    """Input size (px) a plain-ViT SAM state dict was made for, read from ``pos_embed``; None for vit_t."""
    if arch not in VIT_SPECS or POS_EMBED not in state_dict:
        return None
    return state_dict[POS_EMBED].shape[1] * PATCH_SIZE


def resize_state_dict(state_dict: dict[str, torch.Tensor], arch: str, image_size: int) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` (full SAM keys) with the size-dependent tensors made for ``image_size`` px.

    The source size is read from ``pos_embed``; tensors that do not depend on the size are shared, not
    copied. vit_t state dicts are returned unchanged (see module docstring)."""
    source_size = stored_image_size(state_dict, arch)
    if source_size is None or source_size == image_size:
        return dict(state_dict)
    grid = image_size // PATCH_SIZE
    global_blocks = set(VIT_SPECS[arch].global_attn_indexes)
    resized = dict(state_dict)
    resized[POS_EMBED] = resize_pos_embed(state_dict[POS_EMBED], grid)
    for name, table in state_dict.items():
        match = _REL_POS.match(name)
        if match and int(match.group(1)) in global_blocks:
            resized[name] = resize_rel_pos(table, 2 * grid - 1)
    return resized
