"""Input normalisation belongs to the model: what each image encoder was trained to see, applied in one place.

Data slices stay model-agnostic: float B x 1 x S x S in [0, 1] (see :mod:`samadapt.data`). The model turns
them into its encoder's B x 3 x S x S input (:meth:`SamSegmenter.embed <samadapt.models.segmenter.SamSegmenter.embed>`
calls :func:`to_model_input`), so training, validation, evaluation, prediction and the embedding cache feed
an encoder alike. Which normalisation an arch takes is declared by the registry (``registry.input_norm``) and
recorded as ``input_norm`` in the finetune and evaluate stage outputs.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

InputNorm = Literal["sam", "minmax"]
INPUT_NORMS: tuple[str, ...] = get_args(InputNorm)
DESCRIPTIONS = {
    "sam": "x 255, minus SAM's pixel mean, divided by its std (ImageNet statistics on the 0-255 scale, as "
    "Sam.preprocess)",
    "minmax": "each slice rescaled to [0, 1] by its own min and max, repeated to 3 channels, no mean/std "
    "(LiteMedSAM)",
}
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # on the 0-255 scale
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
_MIN_RANGE = 1e-8  # LiteMedSAM's own floor on max - min (a constant slice becomes zeros, not NaN)


def to_sam_input(x: torch.Tensor) -> torch.Tensor:
    """B x 1 x S x S float in [0, 1] → B x 3 x S x S normalised with SAM's pixel mean/std."""
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) * 255.0 - mean) / std


def to_minmax_input(x: torch.Tensor) -> torch.Tensor:
    """B x 1 x S x S → B x 3 x S x S, each slice scaled by its own min/max to [0, 1] (LiteMedSAM's
    ``(img - min) / clip(max - min, 1e-8)``)."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - low) / (high - low).clamp(min=_MIN_RANGE)).expand(-1, 3, -1, -1)


def to_model_input(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Slices B x 1 x S x S in [0, 1] → the B x 3 x S x S input an encoder trained with ``norm`` expects."""
    if norm == "sam":
        return to_sam_input(x)
    if norm == "minmax":
        return to_minmax_input(x)
    raise ValueError(f"input normalisation {norm!r} is not one of {', '.join(INPUT_NORMS)}")
