"""Window-aligned mask units for SAM's windowed ViT (the glue lightly's 1D token masks cannot express).

SAM's encoder keeps its tokens on a ``G x G`` grid (``G = image_size / 16``) and its windowed blocks cut
that grid, zero-padded to ``Gp = ceil(G / w) * w``, into ``U = (Gp / w)^2`` windows of ``w x w`` tokens
(vit_b at 1024 px: 64 → 70, 25 windows of 14 x 14; vit_b at 256 px: 16 → 28, 4 windows; vit_tiny at
256 px: 16, 4 windows of 8 x 8, no padding). A mask unit here is one such window, as in Hiera: a windowed
block then runs on the kept windows only and gives exactly the values it would give on the full grid
there, because windowed attention never mixes windows.

Windows on the padded border hold fewer real patches (vit_b at 256 px: 196, 28, 28 and 4), so the mask
ratio is honoured in units (``U - floor(U * (1 - mask_ratio))`` windows masked, lightly's
``random_token_mask`` rounding) and only approximately in patches.

Patch-level units (``variant=patch_drop``, UM-MAE's uniform masking generalised to any ratio):
``random_patch_mask`` keeps, in *every* window, the same fraction of its real patches, chosen at random
inside the window — ``max(1, floor(n_u * (1 - mask_ratio)))`` of window u's ``n_u`` patches. Every image
and every full window then hold the same number of visible tokens, so the kept tokens form a dense
``B x U x K x C`` tensor (K = the largest count; border windows of a padded grid fill the rest of their
K slots with flagged, ignored entries) and the compute per step is fixed.

Layouts: ``B x U x T x C`` window-major tokens (``T = w * w``), in the order of segment_anything's own
``window_partition`` (row of windows, then column; inside a window row-major), padding included.
"""

from __future__ import annotations

import torch
from lightly.models.utils import random_token_mask
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import Tensor


class WindowLayout:
    """Geometry of a ``G x G`` token grid cut into ``w x w`` windows after zero-padding to ``Gp x Gp``.

    Attributes (plain tensors on the CPU; move them with ``.to(device)`` where used):
        valid: bool U x T, True where the window position holds a real patch (False = padding).
        rows, cols: long U x T, the patch's (row, col) on the unpadded grid; padding positions get (0, 0)
            (they never act as attention keys, see ``sparse_blocks``).
    """

    def __init__(self, grid_size: int, window_size: int) -> None:
        if window_size <= 0:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.grid_size = grid_size
        self.window_size = window_size
        self.padded_size = -(-grid_size // window_size) * window_size
        self.num_units = (self.padded_size // window_size) ** 2
        self.tokens_per_unit = window_size * window_size
        rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        # Partition (1 + row, 1 + col) so that padding (zeros) can be told apart from patch (0, 0).
        coords = self.partition(torch.stack([rows + 1, cols + 1], dim=-1)[None].float())[0].long()
        self.valid = coords[..., 0] > 0
        self.rows = (coords[..., 0] - 1).clamp(min=0)
        self.cols = (coords[..., 1] - 1).clamp(min=0)

    def partition(self, grid: Tensor) -> Tensor:
        """B x G x G x C grid → B x U x T x C windows (zero padding appended, as SAM's blocks do)."""
        batch, _, _, channels = grid.shape
        windows, _ = window_partition(grid, self.window_size)
        return windows.view(batch, self.num_units, self.tokens_per_unit, channels)

    def unpartition(self, windows: Tensor) -> Tensor:
        """B x U x T x C windows → B x G x G x C grid (padding dropped)."""
        batch, _, _, channels = windows.shape
        w = self.window_size
        return window_unpartition(
            windows.reshape(-1, w, w, channels), w, (self.padded_size, self.padded_size),
            (self.grid_size, self.grid_size),
        )

    def num_kept_units(self, mask_ratio: float) -> int:
        """How many windows ``random_unit_mask`` keeps per image (lightly's rounding)."""
        return int(self.num_units * (1 - mask_ratio))

    def random_unit_mask(self, batch_size: int, mask_ratio: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """Random windows to keep and to mask: (idx_keep B x K, idx_mask B x (U - K)) window indices."""
        return random_token_mask((batch_size, self.num_units), mask_ratio, mask_class_token=True, device=device)

    def patch_mask(self, idx_mask: Tensor) -> Tensor:
        """Masked windows B x M → float B x N patch mask (N = G * G, row-major, 1 = masked)."""
        batch = idx_mask.shape[0]
        unit_mask = torch.zeros(batch, self.num_units, device=idx_mask.device).scatter(1, idx_mask, 1.0)
        windows = unit_mask[:, :, None, None].expand(-1, -1, self.tokens_per_unit, 1)
        return self.unpartition(windows).reshape(batch, -1)


    def keep_counts(self, mask_ratio: float) -> Tensor:
        """long U: visible patches per window under ``random_patch_mask`` (lightly's floor rounding, at
        least one so that no window is left without a query)."""
        real = self.valid.sum(dim=1)
        return (real * (1 - mask_ratio)).floor().long().clamp(min=1)

    def random_patch_mask(self, batch_size: int, mask_ratio: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """Random visible patches, ``keep_counts`` per window.

        Returns (idx B x U x K: positions inside each window in [0, T), slot_valid bool U x K: False for the
        slots beyond a window's count, which point at padding positions or at masked patches and must be
        ignored). With mask_ratio 0 the real patches of every window are kept, in random order.
        """
        counts = self.keep_counts(mask_ratio).to(device)
        # Same draw as lightly's random_token_mask (argsort of uniform noise), per window; padding sorts last.
        noise = torch.rand(batch_size, self.num_units, self.tokens_per_unit, device=device)
        noise = noise.masked_fill(~self.valid.to(device), 2.0)
        kept = int(counts.max())
        idx = noise.argsort(dim=-1)[..., :kept]
        return idx, torch.arange(kept, device=device) < counts[:, None]

    def padding_positions(self) -> tuple[Tensor, Tensor]:
        """Padding positions of each window (SAM feeds them as zeros after norm1, so they are keys in
        windowed attention): (idx long U x P positions in [0, T), valid bool U x P), P = most padding."""
        order = self.valid.long().argsort(dim=1, stable=True)  # padding first
        most = int((~self.valid).sum(dim=1).max())
        idx = order[:, :most]
        return idx, ~self.valid.gather(1, idx)


def patch_mask_from_indices(idx_mask: Tensor, num_patches: int) -> Tensor:
    """Masked patch indices B x M → float B x N mask (1 = masked)."""
    return torch.zeros(idx_mask.shape[0], num_patches, device=idx_mask.device).scatter(1, idx_mask, 1.0)
