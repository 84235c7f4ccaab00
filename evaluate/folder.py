"""``samadapt evaluate predictions=DIR``: masks made by anything (nnU-Net, MedSAM, ...) matched to manifest rows.

A case's prediction is ``DIR/<case id><suffix>`` with one of the volume suffixes samadapt reads
(``samadapt.data.formats``); other files in the folder (nnU-Net's ``plans.json``, probabilities) are ignored.
It must lie on its reference label's voxel grid (same size, and spacing / origin / direction within 1e-3 mm),
as every tool that writes masks with the input's geometry does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from samadapt.data import readers
from samadapt.data.formats import VOLUME_SUFFIXES, volume_suffix
from samadapt.data.manifest import Case
from samadapt.errors import UserError


def prediction_files(folder: str | Path, cases: Sequence[Case], manifest: str | Path) -> dict[str, Path]:
    """``{case id: prediction file}`` for every case; a missing or doubled prediction is a UserError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: predictions= is not a folder — give the folder holding <case id>.nii.gz masks")
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        suffix = volume_suffix(path.name)
        if suffix and path.is_file():
            by_stem.setdefault(path.name[: -len(suffix)], []).append(path)
    found = {}
    for case in cases:
        files = by_stem.get(case.id, [])
        if not files:
            raise UserError(f"{folder / (case.id + '.nii.gz')}: no prediction for case {case.id!r} of {manifest} "
                            f"(looked for {case.id}{'|'.join(VOLUME_SUFFIXES)}) — predict every case of the split "
                            "or choose another split=")
        if len(files) > 1:
            raise UserError(f"{files[0]}: case {case.id!r} has {len(files)} predictions "
                            f"({', '.join(f.name for f in files)}) — keep one")
        found[case.id] = files[0]
    return found


def read_pair(case: Case, prediction_file: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Prediction and reference label maps, int64 Z x Y x X, and the spacing (z, y, x) in mm. A prediction on
    another grid than its reference, or with values outside [0, num_classes), is a UserError naming the file."""
    reference_image = readers.read_volume(case.label)
    prediction_image = readers.read_volume(prediction_file)
    reference_grid, prediction_grid = readers.geometry_of(reference_image), readers.geometry_of(prediction_image)
    if prediction_grid["size"] != reference_grid["size"]:
        raise UserError(f"{prediction_file}: prediction shape {tuple(prediction_grid['size'])} (x, y, z) differs "
                        f"from its reference {case.label} {tuple(reference_grid['size'])} — write the masks on the "
                        "reference's voxel grid")
    for name in ("spacing", "origin", "direction"):
        if not np.allclose(prediction_grid[name], reference_grid[name], rtol=0, atol=readers.GEOMETRY_TOLERANCE_MM):
            raise UserError(f"{prediction_file}: prediction {name} {_rounded(prediction_grid[name])} differs from "
                            f"its reference {case.label} {_rounded(reference_grid[name])} — write the masks with the "
                            "reference's geometry")
    arrays = []
    for image, path in ((prediction_image, prediction_file), (reference_image, case.label)):
        values = readers.to_array(image, path)
        readers.check_label_values(values, path, num_classes)
        arrays.append(values.astype(np.int64))
    return arrays[0], arrays[1], tuple(reference_grid["spacing"][::-1])


def _rounded(values: Sequence[float]) -> tuple:
    return tuple(round(float(v), 4) for v in values)
