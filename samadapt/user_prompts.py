"""A user's prompts file for ``samadapt predict``: one 3-D box per case and class, in voxel indices or in mm.

JSON (a list of objects, or ``{"prompts": [...]}``) or CSV with a header; one row per box::

    {"case": "sub-01", "class": 1, "box": [x_min, y_min, z_min, x_max, y_max, z_max]}
    {"case": "sub-01", "class": "brain", "box_mm": [x_min, y_min, z_min, x_max, y_max, z_max]}

CSV columns: ``case, class, x_min, y_min, z_min, x_max, y_max, z_max, unit`` (``unit`` = ``voxel`` or ``mm``).
``case`` is the input's name without its suffix (``sub-01.nii.gz`` → ``sub-01``; a manifest's case id);
``class`` a label value (1..K-1) or a class name of the manifest's ``labels.json``. ``box`` holds inclusive
voxel indices in the file's own index order (i, j, k = x, y, z, as ITK Snap and 3D Slicer show them);
``box_mm`` physical corner coordinates in ITK's LPS frame (for an oblique image, the box is the index-space hull
of its 8 corners).
Each box is drawn into a label volume on the image grid and cut into slices like a reference label, so the
model's canvas sees it exactly where the image is (:func:`canvas_boxes`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samadapt.data import VolumeSlices
from samadapt.errors import UserError
from samadapt.propagation import Box3D, boxes_from_labels

CSV_COLUMNS = ("case", "class", "x_min", "y_min", "z_min", "x_max", "y_max", "z_max", "unit")
UNITS = ("voxel", "mm")


@dataclass(frozen=True)
class UserBox:
    """One row of a prompts file: corners (x, y, z) min and max, inclusive, in ``unit``."""

    case: str
    label: int
    low: tuple[float, float, float]
    high: tuple[float, float, float]
    unit: str


def read_prompts(path: str | Path, label_names: dict[int, str] | None, num_classes: int) -> dict[str, list[UserBox]]:
    """``{case: [UserBox...]}`` from a JSON or CSV prompts file; a one-line UserError naming the file and row for
    a missing field, a non-number, an inside-out box, an unknown class name or a class the model lacks."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    rows = _json_rows(text, path) if path.suffix.lower() == ".json" else _csv_rows(text, path)
    if not rows:
        raise UserError(f"{path}: no prompts inside — one row per case and class with a 3-D box")
    names = {name.lower(): label for label, name in (label_names or {}).items()}
    boxes: dict[str, list[UserBox]] = {}
    for number, row in enumerate(rows, start=1):
        box = _parse_row(row, names, num_classes, f"{path}: prompt {number}")
        if any(b.label == box.label for b in boxes.get(box.case, [])):
            raise UserError(f"{path}: prompt {number}: case {box.case!r} class {box.label} has a box already — "
                            "one 3-D box per case and class")
        boxes.setdefault(box.case, []).append(box)
    return boxes


def _json_rows(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    rows = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{path}: expected a list of prompt objects (or {{\"prompts\": [...]}})")
    return rows


def _csv_rows(text: str, path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_COLUMNS[:-1] if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path}: CSV lacks the column(s) {', '.join(missing)} — header: {', '.join(CSV_COLUMNS)}")
    rows = []
    for number, row in enumerate(reader, start=1):
        unit = (row.get("unit") or "voxel").strip().lower()
        if unit not in UNITS:
            raise UserError(f"{path}: prompt {number}: unit={unit!r} — use voxel or mm")
        rows.append({"case": row["case"], "class": row["class"],
                     "box" if unit == "voxel" else "box_mm": [row[c] for c in CSV_COLUMNS[2:8]]})
    return rows


def _parse_row(row: dict, names: dict[str, int], num_classes: int, where: str) -> UserBox:
    case = str(row.get("case") or "").strip()
    if not case:
        raise UserError(f"{where}: no case — name the input without its suffix (sub-01.nii.gz → sub-01)")
    label = _label(row.get("class"), names, num_classes, where)
    if ("box" in row) == ("box_mm" in row):
        raise UserError(f"{where}: give exactly one of box (voxel indices) or box_mm (mm)")
    unit = "voxel" if "box" in row else "mm"
    values = row["box" if unit == "voxel" else "box_mm"]
    try:
        corners = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{where}: box must be 6 numbers [x_min, y_min, z_min, x_max, y_max, z_max]") from None
    if len(corners) != 6 or not all(np.isfinite(corners)):
        raise UserError(f"{where}: box must be 6 finite numbers [x_min, y_min, z_min, x_max, y_max, z_max]")
    low, high = tuple(corners[:3]), tuple(corners[3:])
    if unit == "voxel" and any(c != int(c) for c in corners):
        raise UserError(f"{where}: box holds voxel indices, which are whole numbers — use box_mm for mm")
    if any(a > b for a, b in zip(low, high)):
        raise UserError(f"{where}: box {corners} is inside out — each min must be <= its max")
    return UserBox(case, label, low, high, unit)


def _label(value, names: dict[str, int], num_classes: int, where: str) -> int:
    text = str(value if value is not None else "").strip()
    if text.lower() in names:
        label = names[text.lower()]
    else:
        try:
            label = int(text)
        except ValueError:
            known = ", ".join(sorted(names)) or "none named"
            raise UserError(f"{where}: class {text!r} is not a number or a class name ({known})") from None
    if not 1 <= label < num_classes:
        raise UserError(f"{where}: class {label} — the model segments classes 1..{num_classes - 1}")
    return label


def box_volume(boxes: list[UserBox], geometry: dict, source: str) -> np.ndarray:
    """The boxes drawn as labels on the image's voxel grid, uint16 (z, y, x); a UserError naming ``source`` for
    a box (partly) outside the image."""
    size = np.asarray(geometry["size"])  # x, y, z
    volume = np.zeros(tuple(int(n) for n in size[::-1]), np.uint16)
    for box in boxes:
        low, high = _index_box(box, geometry)
        if np.any(low < 0) or np.any(high > size - 1):
            raise UserError(f"{source}: the box of class {box.label} ({box.unit} {list(box.low)}–{list(box.high)}) "
                            f"reaches outside the image (indices 0..{(size - 1).tolist()})")
        volume[low[2]:high[2] + 1, low[1]:high[1] + 1, low[0]:high[0] + 1] = box.label
    return volume


def _index_box(box: UserBox, geometry: dict) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (x, y, z) index corners of ``box``; mm corners → the index-space hull of the 8 box corners."""
    if box.unit == "voxel":
        return np.asarray(box.low, int), np.asarray(box.high, int)
    direction = np.asarray(geometry["direction"], float).reshape(3, 3)
    spacing, origin = np.asarray(geometry["spacing"], float), np.asarray(geometry["origin"], float)
    corners = np.array([[lo if bit == 0 else hi for bit, lo, hi in zip(bits, box.low, box.high)]
                        for bits in np.ndindex(2, 2, 2)])
    # ITK: point = origin + direction @ (index * spacing)  →  index = direction^-1 (point - origin) / spacing
    indices = np.linalg.solve(direction, (corners - origin).T).T / spacing
    return np.rint(indices.min(0)).astype(int), np.rint(indices.max(0)).astype(int)


def canvas_boxes(slices: VolumeSlices, boxes: list[UserBox], num_classes: int, source: str) -> list[Box3D]:
    """The users' boxes of one case on the model's slice canvas (N x S x S), one :class:`Box3D` per class."""
    labels = slices.canvas_labels(box_volume(boxes, slices.geometry, source))
    found = boxes_from_labels(labels, num_classes)
    lost = sorted({b.label for b in boxes} - {b.label for b in found})
    if lost:  # a box thinner than a canvas pixel along every slice vanishes in the nearest-neighbour resize
        raise UserError(f"{source}: the box of class {lost[0]} is too thin to cover a pixel of the "
                        f"{slices.prep.image_size}-px slices — draw it at least one voxel wider")
    return found
