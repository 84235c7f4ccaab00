"""The baseline: MONAI's 2D ``UNet`` as a K-class segmenter with the interface inference expects.

:class:`UNetSegmenter` is called like a :class:`~samadapt.models.segmenter.SamSegmenter` in automatic mode
(``model(images, prompts=None) -> logits``, ``predict_labels``, ``probabilities``, ``num_classes``,
``prompt``), so :func:`samadapt.inference.predict_slices` — and with it ``evaluate``, ``predict`` and the
validator — run it unchanged. It always uses a K-channel softmax (MONAI ``DiceCELoss(softmax=True,
to_onehot_y=True)``, like nnU-Net) and sees the data's [0, 1] slices as they are (no encoder normalisation).

A baseline folder holds ``unet.safetensors`` (the network's state dict); the architecture (:class:`UNetKeys`)
and the preprocessing are rebuilt from its ``stage_output.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samadapt.config import from_record
from samadapt.data.preprocessing import Preprocessing
from samadapt.errors import UserError
from samadapt.keys import UNetKeys
from samadapt.models.checkpoints import load_safetensors, save_safetensors
from samadapt.stage_record import STAGE_OUTPUT, read_stage_output
from samadapt.stages import STAGES

BASELINE = STAGES["baseline"]


class UNetSegmenter(nn.Module):
    """A 2D MONAI ``UNet`` (1 input channel, K output channels; K includes background, binary = 2)."""

    prompt = "none"  # automatic masks only: a U-Net takes no prompts
    input_norm = None  # the data's [0, 1] slices as they are (samadapt.models.normalisation is for SAM encoders)

    def __init__(self, keys: UNetKeys) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        channels = keys.channel_list
        self.num_classes = keys.num_classes
        self.net = UNet(spatial_dims=2, in_channels=1, out_channels=keys.num_classes, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=keys.res_units, dropout=keys.dropout)

    def forward(self, images: torch.Tensor, prompts: Any = None) -> torch.Tensor:
        """images: B x 1 x S x S in [0, 1] (S divisible by 2^(levels-1)) → logits B x K x S x S."""
        if prompts is not None:
            raise ValueError("a U-Net baseline takes no prompts")
        return self.net(images)

    def predict_labels(self, logits: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """logits: B x K x S x S → label map B x S x S int64 (argmax; 0 = background)."""
        return logits.argmax(1)

    def probabilities(self, logits: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """logits: B x K x S x S → softmax class probabilities B x K x S x S."""
        return logits.softmax(1)

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MONAI ``DiceCELoss`` on the softmax of logits B x K x S x S against labels B x S x S int → scalar."""
        from monai.losses import DiceCELoss

        return DiceCELoss(softmax=True, to_onehot_y=True)(logits, labels.unsqueeze(1))

    @torch.no_grad()
    def batch_dice(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean foreground Dice of a batch (logits B x K x S x S, labels B x S x S) over the (slice, class) pairs
        where prediction or label has the class; NaN if there are none (the SAM segmenter's train-Dice rule)."""
        from samadapt.models.segmenter import SamSegmenter

        return SamSegmenter.batch_dice(self, logits, labels)


def save_unet(model: UNetSegmenter, out: str | Path) -> Path:
    """Write ``out/unet.safetensors`` atomically (the network's state dict)."""
    return save_safetensors(model.net.state_dict(), BASELINE.path(out, "unet"), metadata={"format": "monai-unet-2d"})


@dataclass
class BaselineModel:
    """A baseline folder's U-Net (eval mode, CPU), the preprocessing it was trained with and the folder's record."""

    model: UNetSegmenter
    keys: UNetKeys
    prep: Preprocessing
    record: dict[str, Any]

    @property
    def train_modalities(self) -> list[str]:
        return (self.record.get("metrics") or {}).get("train_modalities", [])


def load_baseline_output(folder: str | Path, prompt: str | None = None) -> BaselineModel:
    """The trained U-Net of a baseline folder, rebuilt from its ``stage_output.json``; ``prompt`` (if given)
    must be ``none``."""
    folder = Path(folder)
    if prompt not in (None, "none"):
        raise UserError(f"{folder}: a U-Net baseline segments without prompts — drop prompt={prompt}")
    record = read_stage_output(folder)
    source = folder / STAGE_OUTPUT
    keys = from_record(UNetKeys, record.get("config"), source)
    prep = from_record(Preprocessing, record.get("config"), source)
    model = UNetSegmenter(keys)
    tensors, _ = load_safetensors(BASELINE.path(folder, "unet"))
    try:
        model.net.load_state_dict(tensors)
    except RuntimeError as exc:
        raise UserError(f"{BASELINE.path(folder, 'unet')}: does not fit the recorded U-Net "
                        f"(channels={keys.channels}, res_units={keys.res_units}): {str(exc).splitlines()[0]}") from None
    return BaselineModel(model.eval(), keys, prep, record)
