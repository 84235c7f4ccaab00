"""One 3-D box per case and class, propagated slice by slice: what a user draws, instead of a box per slice.

The protocol of the MedSAM / CVPR 2024 "Segment Anything in Medical Images on Laptop" challenge (its
LiteMedSAM 3-D inference): the 3-D box's in-plane rectangle prompts the box's middle slice; each further
slice, walking up to the box's last slice and then down from the middle to its first, is prompted by the
bounding box of its neighbour's prediction grown by a margin (3 px at 256 px), or again by the 3-D box's
rectangle where the neighbour predicted nothing. Slices outside the box are background.

Boxes live on the model's S x S slice canvas (x = column, y = row, inclusive maxima, as in
:mod:`samadapt.models.prompts`): from the reference labels in evaluation (:func:`boxes_from_labels`,
the tight 3-D box of each class), or from a user's prompts file in ``predict``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from samadapt.data import VolumeSlices
from samadapt.embedding_store import EmbeddingStore, encode_slices
from samadapt.models.prompts import Prompts

MARGIN_AT_256 = 3  # px grown around the neighbour's prediction, at a 256-px canvas (the challenge's bbox_shift)


@dataclass(frozen=True)
class Box3D:
    """One class's box on the slice stack: slices ``first``..``last`` (inclusive) and the in-plane
    rectangle ``xyxy`` (x_min, y_min, x_max, y_max in canvas px, inclusive)."""

    label: int
    first: int
    last: int
    xyxy: tuple[float, float, float, float]

    @property
    def middle(self) -> int:
        return (self.first + self.last) // 2


def boxes_from_labels(labels: np.ndarray, num_classes: int) -> list[Box3D]:
    """The tight 3-D box of every foreground class present in ``labels`` (N x S x S int canvas slices)."""
    boxes = []
    for label in range(1, num_classes):
        where = np.nonzero(labels == label)
        if where[0].size == 0:
            continue  # absent class: no prompt, predicted as background (both-empty or a miss)
        z, y, x = where
        boxes.append(Box3D(label, int(z.min()), int(z.max()), (float(x.min()), float(y.min()),
                                                                 float(x.max()), float(y.max()))))
    return boxes


def walk(box: Box3D) -> list[tuple[int, int | None]]:
    """``(slice, neighbour it takes its box from or None)`` in prompting order: middle to last, then
    middle - 1 down to first (each step's neighbour is already predicted)."""
    up = [(z, None if z == box.middle else z - 1) for z in range(box.middle, box.last + 1)]
    down = [(z, z + 1) for z in range(box.middle - 1, box.first - 1, -1)]
    return up + down


def grown_box(mask: torch.Tensor, margin: int) -> tuple[float, float, float, float] | None:
    """Bounding box of a S x S bool mask grown by ``margin`` px and clipped to the canvas; None if empty."""
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    if rows.numel() == 0:
        return None
    size = mask.shape[-1] - 1
    return (float(max(int(cols[0]) - margin, 0)), float(max(int(rows[0]) - margin, 0)),
            float(min(int(cols[-1]) + margin, size)), float(min(int(rows[-1]) + margin, size)))


@torch.no_grad()
def propagate_boxes(model, slices: VolumeSlices, boxes: list[Box3D], batch_size: int,
                    device: torch.device | str = "cpu", store: EmbeddingStore | None = None) -> np.ndarray:
    """Labels uint8 N x S x S of ``slices`` predicted by a box-prompted ``model`` (a SamSegmenter) from one
    :class:`Box3D` per class, by the module's protocol.

    The encoder runs once per slice that some box covers (in batches of ``batch_size``); the decoder once per
    (slice, class), sequentially, since each prompt depends on the previous slice's prediction. ``store``: take
    and keep the embeddings there (:mod:`samadapt.embedding_store`)."""
    was_training = model.training
    model.eval()
    count, size = len(slices), slices.prep.image_size
    foreground = model.num_classes - 1
    margin = round(MARGIN_AT_256 * size / 256)
    covered = sorted({z for box in boxes for z in range(box.first, box.last + 1)})
    embeddings = (store.embeddings(slices, covered, batch_size, device) if store is not None
                  else encode_slices(model, slices, covered, batch_size, device))
    logits = torch.zeros(count, foreground, size, size)
    present = torch.zeros(count, foreground, dtype=torch.bool)
    for box in boxes:
        channel = box.label - 1
        for z, neighbour in walk(box):
            previous = None if neighbour is None else grown_box(logits[neighbour, channel] > 0, margin)
            xyxy = previous or box.xyxy
            prompt_present = torch.zeros(1, foreground, dtype=torch.bool)
            prompt_present[0, channel] = True
            prompt_boxes = torch.zeros(1, foreground, 4)
            prompt_boxes[0, channel] = torch.tensor(xyxy)
            decoded = model.decode(embeddings[z].unsqueeze(0).to(device),
                                   Prompts(present=prompt_present, boxes=prompt_boxes).to(device))
            logits[z, channel] = decoded[0, channel].float().cpu()
            present[z, channel] = True
    model.train(was_training)
    return model.predict_labels(logits, present).to(torch.uint8).numpy()
