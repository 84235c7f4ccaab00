"""Intensity normalisation to [0, 1], decided by modality.

* **CT**: voxels are HU (SimpleITK applies rescale slope/intercept); a window ``W,L`` (or a named preset)
  maps ``[L - W/2, L + W/2]`` to [0, 1]. Default preset: ``soft_tissue``.
* **MR**: clip to the 0.5–99.5 percentiles of the *foreground* and scale to
  [0, 1]. Foreground = an Otsu head mask with holes filled (default, ``mr_foreground="otsu"``), because
  "non-zero voxels" means different things per scanner/template (the MNI152 T1 background is not zero,
  Colin27's is) and that made a model trained on one head fail on the other. ``"nonzero"`` gives the
  classic non-zero-voxel rule. A ``window`` given for MR is applied to the raw intensities instead.

Modalities: ``canonical_modality`` / ``require_modality`` are the one rule (MR or CT, any case; anything else
is refused rather than normalised as MR) for manifests, ``modality=`` keys and ``normalise`` itself.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from samadapt.errors import UserError

WINDOWS = {  # name → (width, level) in HU
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
PERCENTILES = (0.5, 99.5)
MODALITIES = ("MR", "CT")
_ALIASES = {"MR": "MR", "MRI": "MR", "CT": "CT"}


def canonical_modality(value: str | None) -> str | None:
    """The one modality rule: ``MR`` or ``CT`` in any case (``MRI`` = ``MR``), blanks around ignored —
    ``"ct"`` → ``"CT"``, ``" mri"`` → ``"MR"``; None if unknown (``"XR"``, ``"PET"``, empty)."""
    return _ALIASES.get(str(value).strip().upper()) if value is not None else None


def require_modality(value: str | None, where: str) -> str:
    """``canonical_modality(value)``, or a one-line UserError starting with ``where`` (a file and row, or a key
    such as ``modality=``) — so an unknown modality is refused instead of being normalised as MR."""
    modality = canonical_modality(value)
    if modality is None:
        raise UserError(f"{where}: unknown modality {'' if value is None else str(value).strip()!r} — use "
                        f"{' or '.join(MODALITIES)} (any case; MRI = MR)")
    return modality


def parse_window(window: str) -> tuple[float, float]:
    """A preset name or ``"W,L"`` → (width, level) in HU."""
    name = window.strip().lower()
    if name in WINDOWS:
        return WINDOWS[name]
    parts = name.split(",")
    try:
        width, level = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"window={window!r}: use one of {', '.join(WINDOWS)} or 'W,L' such as 400,40") from None
    if width <= 0:
        raise UserError(f"window={window!r}: the width W must be positive")
    return width, level


def apply_window(volume: np.ndarray, window: str) -> np.ndarray:
    """Map ``[L - W/2, L + W/2]`` to [0, 1], clipping outside (float32)."""
    width, level = parse_window(window)
    low = level - width / 2
    return np.clip((volume - low) / width, 0.0, 1.0).astype(np.float32)


def foreground_mask(volume: np.ndarray, method: str = "otsu") -> np.ndarray:
    """Boolean (z, y, x) mask of the imaged object: ``otsu`` (threshold + hole filling) or ``nonzero``."""
    if method == "nonzero":
        return volume != 0
    if method != "otsu":
        raise UserError(f"mr_foreground={method!r}: use otsu or nonzero")
    threshold = otsu_threshold(volume)
    return ndimage.binary_fill_holes(volume > threshold)


def otsu_threshold(volume: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on a histogram of the volume (maximises the between-class variance)."""
    counts, edges = np.histogram(volume, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def percentile_scale(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Clip to the 0.5–99.5 percentiles of ``volume[mask]`` (all voxels if the mask is empty) → [0, 1]."""
    values = volume[mask] if mask.any() else volume.ravel()
    low, high = np.percentile(values, PERCENTILES)
    if high <= low:  # constant image: nothing to scale
        return np.zeros(volume.shape, np.float32)
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def normalise(volume: np.ndarray, modality: str, window: str | None = None, mr_foreground: str = "otsu") -> np.ndarray:
    """(z, y, x) intensities (HU for CT) → float32 in [0, 1] by the rules above; ``modality`` as
    ``require_modality`` takes it (``"ct"`` is CT, an unknown one is an error)."""
    modality = require_modality(modality, "modality")
    if window is not None:
        return apply_window(volume, window)
    if modality == "CT":
        return apply_window(volume, "soft_tissue")
    return percentile_scale(volume, foreground_mask(volume, mr_foreground))
