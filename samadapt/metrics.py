"""Per-case segmentation metrics in mm (MONAI): Dice, IoU, NSD and HD95 per label.

Conventions (design.md): a label absent from both prediction and reference gets NaN for every score
(excluded from means, counted); a label present in only one of them gets Dice = IoU = NSD = 0 and
HD95 = NaN — a distance to nothing is undefined, so it is reported as missing rather than as a made-up
number. These rules are applied here explicitly; MONAI is only called when both masks are non-empty.

Speed: the scores are computed on the bounding box of prediction ∪ reference plus a one-voxel margin.
That is exact: Dice and IoU only count foreground voxels, which all lie inside the box; a surface voxel
is a foreground voxel with a background face-neighbour (MONAI: ``mask XOR binary_erosion(mask)``), and
every neighbour of a foreground voxel lies inside the margin or outside the volume, where erosion sees
background either way; surface distances are differences of voxel coordinates times the spacing, which
a translation of the box does not change. The crop avoids building full-size float tensors per label
(measured ≈ 2x faster than whole-volume MONAI calls for a brain mask in a 256^3 volume).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

SCORES = ("Dice", "IoU", "NSD", "HD95")
COUNTS = ("n_ref", "n_pred")


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
                 nsd_tolerance_mm: float = 2.0) -> dict[int, dict]:
    """Scores of one case for each label.

    pred, ref: integer label maps Z x Y x X (any number of spatial dims, same shape).
    spacing: voxel size along the same axes, (z, y, x) in mm.
    labels: label values to score (usually the foreground classes 1..C-1).
    nsd_tolerance_mm: distance in mm up to which a surface voxel counts as correct for NSD.

    Returns ``{label: {"Dice", "IoU", "NSD", "HD95" (mm), "n_ref", "n_pred" (voxel counts)}}`` with
    Python floats/ints; NaN marks an undefined score (see module docstring).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}-D volume")
    return {int(label): label_metrics(pred == label, ref == label, spacing, nsd_tolerance_mm)
            for label in labels}


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...],
                  nsd_tolerance_mm: float) -> dict:
    """Scores of one binary prediction mask against one binary reference mask (same shape, bool)."""
    counts = {"n_ref": int(np.count_nonzero(ref)), "n_pred": int(np.count_nonzero(pred))}
    if counts["n_ref"] == 0 and counts["n_pred"] == 0:
        return {name: math.nan for name in SCORES} | counts
    if counts["n_ref"] == 0 or counts["n_pred"] == 0:
        return {"Dice": 0.0, "IoU": 0.0, "NSD": 0.0, "HD95": math.nan} | counts

    box = union_box(pred, ref, margin=1)
    # MONAI metrics take one-hot batches B x C x spatial; here B = C = 1 (this label only).
    y_pred = torch.from_numpy(pred[box]).float()[None, None]
    y_ref = torch.from_numpy(ref[box]).float()[None, None]
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated ``always_return_as_numpy`` argument internally; the
        # warning says nothing about our inputs and would repeat in every evaluation log.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        scores = {
            "Dice": compute_dice(y_pred, y_ref, include_background=True),
            "IoU": compute_iou(y_pred, y_ref, include_background=True),
            "NSD": compute_surface_dice(y_pred, y_ref, class_thresholds=[float(nsd_tolerance_mm)],
                                        include_background=True, spacing=spacing),
            "HD95": compute_hausdorff_distance(y_pred, y_ref, include_background=True, percentile=95,
                                               spacing=spacing),
        }
    return {name: float(value.item()) for name, value in scores.items()} | counts


def union_box(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of ``a | b`` (non-empty bool arrays) grown by ``margin`` voxels,
    clipped to the array (outside the array counts as background for MONAI's erosion anyway)."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, union.shape[axis])))
    return tuple(box)
