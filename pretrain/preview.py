"""Reconstruction previews: one row per image, columns input | masked | reconstruction (the last
only when the MAE predicts pixels)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import torch  # noqa: E402

from samadapt.io import atomic_path  # noqa: E402


@torch.no_grad()
def write_preview(mae, images: torch.Tensor, path: Path) -> Path:
    """Save a PNG grid for ``images`` (B x 3 x S x S, SAM pixel-normalised) through ``mae``."""
    was_training = mae.training
    mae.eval()
    output = mae(images)
    masked, reconstructed = mae.reconstruct(images, output)
    mae.train(was_training)
    columns = {"input": images, "masked": masked}
    if reconstructed is not None:  # target=features predicts no pixels
        columns["reconstruction"] = reconstructed
    figure, axes = plt.subplots(len(images), len(columns), figsize=(2.5 * len(columns), 2.5 * len(images)),
                                squeeze=False)
    for row in range(len(images)):
        for col, (title, batch) in enumerate(columns.items()):
            gray = batch[row].float().mean(0).cpu()  # channels are copies of one grey slice
            axes[row][col].imshow(gray, cmap="gray")
            axes[row][col].set_axis_off()
            if row == 0:
                axes[row][col].set_title(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return path
