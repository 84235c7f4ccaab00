"""The data layer: every stage reads volumes only through it.

Conventions (one for the whole project):

* **Reading**: SimpleITK only (NIfTI, NRRD, MHA/MHD, DICOM series folders); nibabel appears only in a test
  proving that both libraries agree on world coordinates. World coordinates are LPS (SimpleITK's).
* **Canonical orientation**: after reading, axes are permuted/flipped from the direction cosines to LPS —
  array axes (z, y, x) increase towards Superior, Posterior, Left — so the same anatomy gives the same
  slice whatever voxel order a file was stored in (``geometry.canonical_transform``). Arrays are always
  (z, y, x); spacing is (z, y, x) in mm.
* **Planes**: ``axial`` = slices along z, shown radiologically (anterior at the top, patient right on the
  left); ``coronal`` / ``sagittal`` slices have superior at the top.
* **Intensities**: CT in HU (rescale slope/intercept applied) mapped through a window (``soft_tissue``
  W400/L40 by default, ``lung``, ``bone``, ``brain`` or ``"W,L"``); MR clipped to the 0.5–99.5
  percentiles of an Otsu head mask (holes filled) and scaled to [0, 1] (``normalise``).
* **Slices**: physical aspect ratio kept (anisotropic pixels are resampled, not stretched), longest side
  fitted to ``image_size`` (or ``spacing`` mm pixels, centre pad/crop), zero-padded to square; the
  :class:`~samadapt.data.geometry.SliceMapping` undoes it all so predictions land on the original voxel
  grid and are written with the input's exact spacing/origin/direction.
* **Model input**: slices stay model-agnostic in [0, 1]; each model normalises them as its encoder expects
  (:mod:`samadapt.models.normalisation`; ``to_sam_input`` is SAM's pixel-mean/std one, re-exported here).

Modules: ``manifest`` (Case, load/resolve manifests), ``readers``, ``normalise``, ``geometry``,
``preprocessing`` (Preprocessing), ``slices`` (VolumeSlices), ``cache`` (slice cache),
``augment`` (AugmentConfig), ``datasets`` (SliceDataset), ``importers``, ``demo``, ``commands`` (CLI).
Heavy modules are imported lazily so ``samadapt --help`` stays fast.
"""

from __future__ import annotations

import importlib

from samadapt.data.augment import AugmentConfig
from samadapt.data.preprocessing import Preprocessing

_LAZY = {
    "VolumeSlices": "samadapt.data.slices",
    "to_sam_input": "samadapt.models.normalisation",
    "write_labels": "samadapt.data.slices",
    "save_probabilities": "samadapt.data.slices",
    "SliceDataset": "samadapt.data.datasets",
    "SliceMapping": "samadapt.data.geometry",
    "Case": "samadapt.data.manifest",
    "load_manifest": "samadapt.data.manifest",
    "resolve_manifest": "samadapt.data.manifest",
    "load_label_names": "samadapt.data.manifest",
}

__all__ = ["AugmentConfig", "Preprocessing", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'samadapt.data' has no attribute {name!r}")
