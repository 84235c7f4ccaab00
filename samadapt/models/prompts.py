"""Box and point prompts derived from label maps, one prompt per (slice, foreground class).

Coordinates are in the pixel frame of the S x S model input that SAM's prompt encoder expects:
``x`` = column index, ``y`` = row index, both in pixels (the prompt encoder adds 0.5 to reach pixel
centres itself). Boxes are ``x_min, y_min, x_max, y_max`` with inclusive maxima, like segment_anything's
``batched_mask_to_box``.

Empty-class rule: a foreground class with no pixel in a slice gets no prompt and ``present = False``.
The segmenter then predicts nothing for it (its logits are "absent", i.e. background), the loss ignores
it, and evaluation counts a class that the reference lacks and the prediction lacks as both-empty (NaN).
A prompt is never invented for a class that is not in the reference: prompts come from the ground truth,
as in SAM's and MedSAM's box/point evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from scipy import ndimage

PAD_POINT = -1  # SAM's label for "not a point": the prompt encoder ignores such points


@dataclass
class Prompts:
    """Prompts for a batch: ``present`` B x (K-1) bool says which foreground classes are prompted.

    Exactly one of ``boxes`` (B x (K-1) x 4, xyxy px) or ``point_coords`` (B x (K-1) x P x 2, xy px) with
    ``point_labels`` (B x (K-1) x P: 1 positive, 0 negative, -1 padding) is set. Entries of classes that
    are not present are zeros (boxes/coords) and -1 (point labels) and are never read.
    """

    present: torch.Tensor
    boxes: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Prompts:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, present=move(self.present), boxes=move(self.boxes),
            point_coords=move(self.point_coords), point_labels=move(self.point_labels),
        )


def _class_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels: B x S x S int → B x (K-1) x S x S bool, one mask per foreground class 1..K-1."""
    classes = torch.arange(1, num_classes, device=labels.device)
    return labels.unsqueeze(1) == classes.view(1, -1, 1, 1)


def boxes_from_labels(
    labels: torch.Tensor, num_classes: int, jitter: float = 0.0, rng: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding box per (slice, foreground class), optionally jittered.

    labels: B x S x S int, 0 = background. jitter: each coordinate moves by a uniform offset in
    ``[-jitter, +jitter]`` x the box side along its axis (side = max - min + 1 px), then is clipped to
    the image. Returns boxes B x (K-1) x 4 float (x_min, y_min, x_max, y_max in px, inclusive) and
    present B x (K-1) bool (empty class: no box, present False).
    """
    masks = _class_masks(labels, num_classes)
    present = masks.flatten(2).any(-1)
    height, width = labels.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)  # B x (K-1) x S: which rows / columns hold the class
    y_min, y_max = _first_last(rows)
    x_min, x_max = _first_last(cols)
    boxes = torch.stack([x_min, y_min, x_max, y_max], dim=-1).float()
    if jitter > 0:
        sides = (boxes[..., 2:] - boxes[..., :2] + 1).repeat(1, 1, 2)  # width, height, width, height
        noise = torch.rand(boxes.shape, generator=rng, device="cpu").to(boxes.device) * 2 - 1
        boxes = boxes + noise * jitter * sides
        limits = torch.tensor([width - 1, height - 1] * 2, dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
        # Jitter must not turn a box inside out: keep min <= max per axis.
        low, high = torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])
        boxes = torch.cat([low, high], dim=-1)
    return torch.where(present.unsqueeze(-1), boxes, torch.zeros_like(boxes)), present


def _first_last(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """occupied: ... x N bool → index of the first and last True along the last dim (0 when none)."""
    index = torch.arange(occupied.shape[-1], device=occupied.device)
    first = torch.where(occupied, index, occupied.shape[-1]).amin(-1)
    last = torch.where(occupied, index, -1).amax(-1)
    return first.clamp(min=0), last.clamp(min=0)


def points_from_labels(
    labels: torch.Tensor, num_classes: int, num_positive: int = 1, num_negative: int = 0,
    rng: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive points inside each foreground class and negative points outside it.

    labels: B x S x S int. Positives are drawn without replacement (with replacement when the class has
    fewer pixels) with probability proportional to the Euclidean distance to the class border
    (distance transform), so they favour the interior over the rim. Negatives are drawn uniformly from
    pixels outside the class within its bounding box grown by its own size on each side (near the object,
    where a negative point says something), falling back to the whole image outside the class; when the
    class fills the image the negative slots are padding. Empty class: no points, present False.

    Returns coords B x (K-1) x P x 2 float (x, y in px), point_labels B x (K-1) x P int64 (1 positive,
    0 negative, -1 padding) with P = num_positive + num_negative, and present B x (K-1) bool.
    """
    if num_positive < 1 or num_negative < 0:
        raise ValueError(f"need num_positive >= 1 and num_negative >= 0, got {num_positive}, {num_negative}")
    masks = _class_masks(labels, num_classes).cpu()
    batch, foreground, height, width = masks.shape
    num_points = num_positive + num_negative
    coords = torch.zeros(batch, foreground, num_points, 2)
    point_labels = torch.full((batch, foreground, num_points), PAD_POINT, dtype=torch.int64)
    present = masks.flatten(2).any(-1)
    boxes, _ = boxes_from_labels(labels.cpu(), num_classes)
    for b, k in present.nonzero().tolist():
        mask = masks[b, k]
        interior = torch.from_numpy(ndimage.distance_transform_edt(mask.numpy())).float().flatten()
        positives = _sample(interior, num_positive, rng)
        near = torch.zeros_like(mask)
        x_min, y_min, x_max, y_max = boxes[b, k].long().tolist()
        grow_x, grow_y = x_max - x_min + 1, y_max - y_min + 1
        near[max(0, y_min - grow_y): y_max + grow_y + 1, max(0, x_min - grow_x): x_max + grow_x + 1] = True
        outside = ~mask & near
        outside = outside if outside.any() else ~mask
        negatives = _sample(outside.flatten().float(), num_negative, rng) if num_negative else positives[:0]
        chosen = torch.cat([positives, negatives])
        coords[b, k, : len(chosen)] = torch.stack([chosen % width, chosen // width], dim=-1).float()
        point_labels[b, k, :num_positive] = 1
        point_labels[b, k, num_positive: len(chosen)] = 0
    device = labels.device
    return coords.to(device), point_labels.to(device), present.to(device)


def _sample(weights: torch.Tensor, count: int, rng: torch.Generator | None) -> torch.Tensor:
    """``count`` flat indices drawn ∝ weights (N,), without replacement when enough are non-zero;
    none when every weight is zero."""
    available = int((weights > 0).sum())
    if available == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.multinomial(weights, count, replacement=available < count, generator=rng)


def prompts_from_labels(
    mode: str, labels: torch.Tensor, num_classes: int, rng: torch.Generator | None = None, *,
    box_jitter: float = 0.0, num_positive: int = 1, num_negative: int = 0,
) -> Prompts | None:
    """The prompts of ``mode`` (``none`` → None, ``box``, ``point``) for labels B x S x S."""
    if mode == "none":
        return None
    if mode == "box":
        boxes, present = boxes_from_labels(labels, num_classes, box_jitter, rng)
        return Prompts(present=present, boxes=boxes)
    if mode == "point":
        coords, point_labels, present = points_from_labels(labels, num_classes, num_positive, num_negative, rng)
        return Prompts(present=present, point_coords=coords, point_labels=point_labels)
    raise ValueError(f"unknown prompt mode {mode!r}")
