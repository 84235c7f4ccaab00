"""Per-case segmentation metrics in mm: Dice, IoU, NSD at several tolerances and HD95 per label, nnU-Net's counts.

The rules (design.md "Metrics"; each one is written into ``summary.json`` by :func:`rules`):

- Voxel counts per label as nnU-Net's ``compute_metrics``: TP, FP, FN, TN, ``n_pred = TP + FP``,
  ``n_ref = TP + FN``; Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), on the whole 3-D volume.
- Both masks empty: every score NaN (excluded from means, counted).
- Prediction on an empty reference (a false positive) and empty prediction on a non-empty reference (a miss):
  Dice = IoU = 0; HD95 = the image diagonal in mm and NSD = 0 (``empty_penalty=True``, the default), or HD95
  and NSD NaN (``empty_penalty=False``: excluded from the means, counted). A score that vanished from the
  mean would make missing more structures look *better*.
- Surface voxels: ``mask XOR binary_erosion(mask)`` (face connectivity, outside the volume is background),
  as MONAI and the DeepMind surface-distance code without sub-voxel areas.
- Surface distances: from each surface voxel of one mask to the nearest surface voxel of the other, exact
  Euclidean in mm in float64, ``sqrt(sum_axis((index difference * spacing)^2))``.
- HD95 = max(95th percentile of pred→ref, 95th percentile of ref→pred), numpy's default (linear)
  interpolation — the larger of the two one-way percentiles, as MONAI; medpy pools both directions instead.
- NSD at tolerance t = (pred surface voxels with distance <= t + ref surface voxels with distance <= t)
  / (all surface voxels of both): the tie rule is "<=" on float64 distances.
- Object size: the reference object's fraction of the image volume, ``n_ref / (TP + FP + FN + TN)``, puts a
  (case, label) in a stratum (:data:`SIZE_STRATA`: small < 0.1 %, medium < 1 %, large otherwise), as SAMRI
  reports scores by object size; an empty reference has none.

One pass per (case, label): the surface voxels of both masks and the two arrays of surface distances are
computed once and give HD95 and NSD at every tolerance. Nearest surface voxels are found with a KD-tree over
the surface voxels' coordinates (scipy), the distance then recomputed from integer index differences, so it
does not depend on the tree's float rounding (≈ 4x faster than a pair of ``distance_transform_edt`` over
the bounding box, and exact either way).

Speed: surfaces are computed on the bounding box of prediction ∪ reference plus a one-voxel margin. That is
exact: every surface voxel is a foreground voxel, all inside the box, and every neighbour of a foreground
voxel lies inside the margin or outside the volume, where erosion sees background either way.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial import KDTree

DEFAULT_NSD_TOLERANCES_MM = (1.0, 2.0)  # Metrics Reloaded (1 mm) and the MedSAM challenge (2 mm)
MAX_TOLERANCE_MM = 1000.0
HD_PERCENTILE = 95.0
COUNTS = ("TP", "FP", "FN", "TN", "n_pred", "n_ref")  # nnU-Net's names
EMPTY_CASES = ("miss", "false_positive", "both_empty")
# Object-size strata: (name, upper bound of the reference's fraction of the image volume, exclusive).
SIZE_STRATA = (("small", 0.001), ("medium", 0.01), ("large", math.inf))


def mm(value: float) -> str:
    """A length in mm as written in keys and headers: ``1``, ``1.5``, ``0.25`` (up to 15 digits, no trailing 0)."""
    return f"{float(value):.15g}"


def nsd_name(tolerance_mm: float) -> str:
    """The NSD score's key at one tolerance: ``NSD_1mm``, ``NSD_1.5mm``."""
    return f"NSD_{mm(tolerance_mm)}mm"


def score_names(nsd_tolerances_mm: float | Iterable[float] | str = DEFAULT_NSD_TOLERANCES_MM) -> tuple[str, ...]:
    """Score keys in report order: Dice, IoU, NSD_<t>mm per tolerance, HD95."""
    return ("Dice", "IoU", *(nsd_name(t) for t in parse_tolerances(nsd_tolerances_mm)), "HD95")


def parse_tolerances(value: float | Iterable[float] | str, name: str = "nsd_tolerances_mm") -> tuple[float, ...]:
    """NSD tolerances in mm from a number, a sequence or a comma list (``"1,2"``): finite, in (0, 1000], no
    repeats, in the order given. ValueError ``"<name>=<value>: ..."`` otherwise."""
    if isinstance(value, str):
        items: list = [item.strip() for item in value.split(",") if item.strip()]
        shown = value
    elif isinstance(value, (int, float)):
        items = [value]
        shown = f"{value}"
    else:
        items = list(value)
        shown = ",".join(str(item) for item in items)
    tolerances: list[float] = []
    for item in items:
        try:
            tolerance = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={shown}: {item!r} is not a number of mm (write e.g. 1,2)") from None
        if not math.isfinite(tolerance):
            raise ValueError(f"{name}={shown}: must be a finite number")
        if not 0 < tolerance <= MAX_TOLERANCE_MM:
            raise ValueError(f"{name}={shown}: must be in (0, {MAX_TOLERANCE_MM:g}]")
        if tolerance not in tolerances:
            tolerances.append(tolerance)
    if not tolerances:
        raise ValueError(f"{name}={shown}: no tolerance given (write e.g. 1,2)")
    return tuple(tolerances)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The physical diagonal of the volume's extent, ``sqrt(sum((n_i * spacing_i)^2))`` in mm: the HD95 penalty
    of a miss or a false positive (BraTS's 373.13 mm is this for 240 x 240 x 155 voxels of 1 mm)."""
    return float(math.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def empty_case(n_pred: int, n_ref: int) -> str | None:
    """``"miss"`` (empty prediction, non-empty reference), ``"false_positive"`` (prediction on an empty
    reference), ``"both_empty"``, or None when both masks have voxels."""
    if n_ref == 0:
        return "both_empty" if n_pred == 0 else "false_positive"
    return "miss" if n_pred == 0 else None


def size_stratum(n_ref: int, n_voxels: int) -> str | None:
    """``"small"``, ``"medium"`` or ``"large"`` by the reference object's fraction ``n_ref / n_voxels`` of the
    image volume (:data:`SIZE_STRATA`); None for an empty reference."""
    if not n_ref:
        return None
    fraction = n_ref / n_voxels
    return next(name for name, upper in SIZE_STRATA if fraction < upper)


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Iterable[int],
                 nsd_tolerances_mm: float | Iterable[float] | str = DEFAULT_NSD_TOLERANCES_MM, *,
                 empty_penalty: bool = True, surface: bool = True) -> dict[int, dict]:
    """Scores of one case for each label.

    pred, ref: integer label maps Z x Y x X (any number of spatial dims, same shape).
    spacing: voxel size along the same axes, (z, y, x) in mm.
    labels: label values to score (usually the foreground classes 1..C-1).
    nsd_tolerances_mm: distance(s) in mm up to which a surface voxel counts as correct for NSD (a number,
        a sequence or a comma list); one ``NSD_<t>mm`` score each.
    empty_penalty: a miss or a false positive gets HD95 = image diagonal and NSD = 0 (True) or NaN (False).
    surface: False skips HD95 and NSD (their keys are then absent): for callers that need Dice only.

    Returns ``{label: {"Dice", "IoU", "NSD_<t>mm"..., "HD95" (mm), "TP", "FP", "FN", "TN", "n_pred", "n_ref"
    (voxel counts)}}`` with Python floats/ints; NaN marks an undefined score (see the module docstring).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}-D volume")
    tolerances = parse_tolerances(nsd_tolerances_mm)
    penalty = image_diagonal_mm(pred.shape, spacing) if empty_penalty else None
    return {int(label): label_metrics(pred == label, ref == label, spacing, tolerances, penalty, surface=surface)
            for label in labels}


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerances: Sequence[float],
                  hd95_penalty_mm: float | None, surface: bool = True) -> dict:
    """Scores of one binary prediction mask against one binary reference mask (same shape, bool).

    hd95_penalty_mm: HD95 of a miss or a false positive (NSD then 0); None gives NaN for both."""
    counts = voxel_counts(pred, ref)
    tp, fp, fn = counts["TP"], counts["FP"], counts["FN"]
    if tp + fp + fn == 0:
        scores = {"Dice": math.nan, "IoU": math.nan}
    else:
        scores = {"Dice": 2 * tp / (2 * tp + fp + fn), "IoU": tp / (tp + fp + fn)}
    if not surface:
        return scores | counts
    kind = empty_case(counts["n_pred"], counts["n_ref"])
    if kind is None:
        to_ref, to_pred = surface_distances(pred, ref, spacing)
        scores |= {nsd_name(t): normalized_surface_dice(to_ref, to_pred, t) for t in tolerances}
        scores["HD95"] = hd95(to_ref, to_pred)
    elif kind == "both_empty" or hd95_penalty_mm is None:
        scores |= {nsd_name(t): math.nan for t in tolerances} | {"HD95": math.nan}
    else:
        scores |= {nsd_name(t): 0.0 for t in tolerances} | {"HD95": float(hd95_penalty_mm)}
    return scores | counts


def voxel_counts(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """nnU-Net's TP, FP, FN, TN, n_pred, n_ref of two bool masks."""
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref)) if n_pred and n_ref else 0
    fp, fn = n_pred - tp, n_ref - tp
    return {"TP": tp, "FP": fp, "FN": fn, "TN": int(pred.size) - tp - fp - fn, "n_pred": n_pred, "n_ref": n_ref}


def surfaces(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a bool mask: foreground voxels with a background face-neighbour (or the border)."""
    return mask ^ binary_erosion(mask)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm (float64) from each surface voxel of ``pred`` to the nearest surface voxel of ``ref``,
    and from each of ``ref`` to ``pred``. Both masks non-empty bool arrays of one shape."""
    box = union_box(pred, ref, margin=1)
    points_pred = np.argwhere(surfaces(pred[box]))
    points_ref = np.argwhere(surfaces(ref[box]))
    scale = np.asarray(spacing, dtype=np.float64)
    return (_nearest_distances(points_pred, points_ref, scale), _nearest_distances(points_ref, points_pred, scale))


def _nearest_distances(points: np.ndarray, targets: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel index in ``points`` to its nearest one in ``targets``: the tree finds the
    nearest, the distance is recomputed as sqrt(sum((index difference * spacing)^2)) in float64."""
    _, nearest = KDTree(targets * scale, leafsize=32).query(points * scale, k=1)
    offsets = (points - targets[nearest]).astype(np.float64) * scale
    return np.sqrt(np.square(offsets).sum(axis=1))


def hd95(to_ref: np.ndarray, to_pred: np.ndarray) -> float:
    """The larger of the two one-way 95th percentiles (numpy's linear interpolation)."""
    return float(max(np.percentile(to_ref, HD_PERCENTILE), np.percentile(to_pred, HD_PERCENTILE)))


def normalized_surface_dice(to_ref: np.ndarray, to_pred: np.ndarray, tolerance_mm: float) -> float:
    """Fraction of the surface voxels of both masks within ``tolerance_mm`` (<=) of the other surface."""
    within = np.count_nonzero(to_ref <= tolerance_mm) + np.count_nonzero(to_pred <= tolerance_mm)
    return float(within / (to_ref.size + to_pred.size))


def rules(nsd_tolerances_mm: float | Iterable[float] | str = DEFAULT_NSD_TOLERANCES_MM,
          empty_penalty: bool = True) -> dict[str, str]:
    """Every scoring rule in one line each, as written into ``summary.json`` ("rules")."""
    tolerances = ", ".join(mm(t) for t in parse_tolerances(nsd_tolerances_mm))
    if empty_penalty:
        penalty = ("HD95 = image diagonal in mm, sqrt(sum((voxels_i * spacing_i)^2)) of the whole volume (as BraTS's "
                   "373.13 mm), and NSD = 0 (empty_penalty=true)")
    else:
        penalty = "HD95 and NSD = NaN, excluded from the means and counted in n_nan (empty_penalty=false)"
    return {
        "counts": "TP, FP, FN, TN voxels per class and case on the whole volume, n_pred = TP + FP, n_ref = TP + FN "
                  "(nnU-Net's fields)",
        "dice_iou": "Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), per 3-D volume (nnU-Net)",
        "both_empty": "prediction and reference both empty: Dice, IoU, NSD and HD95 = NaN (null in JSON, an empty "
                      "CSV cell), excluded from the means and counted in n_both_empty",
        "false_positive": "prediction on an empty reference: Dice = IoU = 0; " + penalty
                          + "; counted in n_false_positive",
        "miss": "empty prediction on a non-empty reference: Dice = IoU = 0; " + penalty + "; counted in n_miss",
        "surface": "surface voxels = mask XOR binary_erosion(mask), face connectivity, outside the volume is "
                   "background",
        "surface_distance": "from each surface voxel of one mask to the nearest surface voxel of the other: "
                            "Euclidean in mm, sqrt(sum((index difference * spacing)^2)), float64",
        "hd95": "HD95 = max(95th percentile pred->ref, 95th percentile ref->pred) of the surface distances, "
                "linear interpolation (numpy's default); the larger one-way percentile, not the pooled one",
        "nsd": f"NSD at t mm (t = {tolerances}) = (surface voxels of both masks whose distance to the other "
               "surface is <= t) / (all surface voxels of both); ties at t count as within (<=, float64)",
        "size_strata": "object size = n_ref / (TP + FP + FN + TN), the reference's fraction of the image volume: "
                       + ", ".join(f"{name} < {upper * 100:g} %" for name, upper in SIZE_STRATA[:-1])
                       + f", {SIZE_STRATA[-1][0]} otherwise; an empty reference has no stratum; per stratum: "
                       "means over its cases and n_cases",
        "mean": "per class: mean over cases ignoring NaN (n_nan counts them); foreground_mean: mean of the "
                "foreground classes' means, NaN if a class's mean is NaN (nnU-Net)",
    }


def union_box(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of ``a | b`` (non-empty bool arrays) grown by ``margin`` voxels,
    clipped to the array (outside the array counts as background for the erosion anyway)."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, union.shape[axis])))
    return tuple(box)
