"""``samadapt data import``: turn a dataset folder into a manifest (+ ``<stem>.labels.json``).

* **nnU-Net v2 raw** (``dataset.json`` with ``channel_names``/``file_ending``, ``imagesTr/<case>_0000.nii.gz``,
  ``labelsTr/<case>.nii.gz``, optional ``imagesTs/``): one row per case, image = channel ``channel``.
* **Medical Segmentation Decathlon** (``dataset.json`` with ``training``/``test`` lists): one row per
  case; 4D multi-modal images need ``channel=`` in the stages.
* **Any other folder**: every NIfTI/NRRD/MHA file and DICOM series folder → an unlabeled manifest (SSL).

Labelled training cases are split by case (never by slice), seeded: ``val_fraction`` of them become
``split=val``; ``folds=K`` writes a ``fold`` column (0..K-1) for K-fold cross-validation.

Everything is checked before anything is written: ``out`` (a ``.jsonl`` or ``.csv`` file name, not a folder),
``dataset.json`` (its ``labels``, ``channel_names``, ``training``/``test`` entries) and the listed files; a
mistake is one UserError naming the file and the entry.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from samadapt.data.dicom import dicom_series
from samadapt.data.formats import VOLUME_SUFFIXES, volume_stem
from samadapt.data.manifest import check_manifest_out, label_mapping, read_text, write_manifest
from samadapt.data.normalise import require_modality
from samadapt.errors import UserError
from samadapt.io import write_json


def import_dataset(folder: str | Path, out: str | Path, val_fraction: float = 0.0, folds: int | None = None,
                   seed: int = 0, modality: str = "MR", channel: int = 0) -> dict:
    """Write the manifest ``out`` for ``folder``; returns a summary (kind, counts per split, paths)."""
    folder, out = Path(folder), check_manifest_out(out)
    modality = require_modality(modality, "--modality")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder — give an nnU-Net/MSD dataset folder or a folder of images")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if folds is not None and folds < 2:
        raise UserError(f"--folds {folds}: need at least 2 folds")
    dataset_json = folder / "dataset.json"
    labels = None
    if dataset_json.is_file():
        meta = _read_json(dataset_json)
        labels = _labels(meta, dataset_json)
        if "training" in meta:
            kind, rows = "msd", _msd_rows(folder, meta)
        else:
            kind, rows = "nnunet", _nnunet_rows(folder, meta, channel)
    else:
        kind, rows = "folder", _folder_rows(folder, modality)
    if not rows:
        raise UserError(f"{folder}: no images found ({', '.join(VOLUME_SUFFIXES)} files or DICOM series)")
    _assign_splits(rows, val_fraction, folds, seed)
    write_manifest(out, rows)
    summary = {"kind": kind, "manifest": str(out), "cases": len(rows),
               "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}}
    if labels:
        labels_path = out.with_name(out.stem + ".labels.json")
        write_json(labels_path, {"labels": labels})
        summary["labels"] = str(labels_path)
    return summary


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _labels(meta: dict, path: Path) -> dict | None:
    """``dataset.json``'s ``labels`` as written to ``<stem>.labels.json`` (None if absent), checked so that the
    sidecar loads: a mapping of integer class ids (nnU-Net ``{"background": 0}``, MSD ``{"0": "background"}``)."""
    labels = meta.get("labels")
    if labels is None or labels == {}:
        return None
    if isinstance(labels, dict) and any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise UserError(f"{path}: region-based labels are not supported — use integer classes")
    label_mapping(labels, path)
    return labels


def _modality(name: object) -> str:
    """A dataset channel's name → modality: nnU-Net/MSD channel names are free text (T2, ADC, FLAIR, ...) and,
    as in nnU-Net, only ``CT`` means CT."""
    return "CT" if str(name).strip().upper() == "CT" else "MR"


def _nnunet_rows(folder: Path, meta: dict, channel: int) -> list[dict]:
    path = folder / "dataset.json"
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "MR"}
    if not isinstance(channels, dict):
        raise UserError(f'{path}: channel_names must be a mapping such as {{"0": "CT"}}, not a '
                        f"{type(channels).__name__}")
    if str(channel) not in channels:
        raise UserError(f"{path}: no channel {channel} (channels: {channels}) — use --channel")
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise UserError(f'{path}: file_ending {ending!r} must be a file suffix such as ".nii.gz"')
    modality = _modality(channels[str(channel)])
    suffix = f"_{channel:04d}{ending}"
    rows = []
    for images, labels, split in (("imagesTr", "labelsTr", ""), ("imagesTs", "labelsTs", "test")):
        for image in sorted((folder / images).glob(f"*{suffix}")):
            case = image.name[: -len(suffix)]
            label = folder / labels / f"{case}{ending}"
            if split == "" and not label.is_file():
                raise UserError(f"{image}: no label {label} — nnU-Net training cases need one")
            rows.append({"id": case, "image": image, "label": label if label.is_file() else None,
                         "modality": modality, "split": split})
    return rows


def _msd_rows(folder: Path, meta: dict) -> list[dict]:
    path = folder / "dataset.json"
    channels = meta.get("modality") or {"0": "MR"}
    modality = _modality(channels.get("0", "MR") if isinstance(channels, dict) else channels)
    rows = []
    for number, entry in enumerate(_entries(meta, "training", path), start=1):
        where = f"{path}: training entry {number}"
        if not isinstance(entry, dict):
            raise UserError(f'{where} is {_short(entry)}, not {{"image": ..., "label": ...}} — each Decathlon '
                            "training case needs an image and a label path (unlabeled images go under \"test\")")
        image, label = (_listed(folder, entry, key, where) for key in ("image", "label"))
        rows.append({"id": volume_stem(image), "image": image, "label": label, "modality": modality, "split": ""})
    for number, entry in enumerate(_entries(meta, "test", path), start=1):
        where = f"{path}: test entry {number}"
        image = _listed(folder, {"image": entry} if isinstance(entry, str) else entry, "image", where, required=False)
        if image is not None:
            rows.append({"id": volume_stem(image), "image": image, "label": None, "modality": modality,
                         "split": "test"})
    return rows


def _entries(meta: dict, key: str, path: Path) -> list:
    entries = meta.get(key) or []
    if not isinstance(entries, list):
        raise UserError(f'{path}: "{key}" must be a list of {{"image": ..., "label": ...}} entries (or of image '
                        f"paths for test), not a {type(entries).__name__}")
    return entries


def _listed(folder: Path, entry: object, key: str, where: str, required: bool = True) -> Path | None:
    """``folder / entry[key]``: a path that must be given; a training file must exist, a missing test image is
    skipped (MSD lists test images that are not distributed)."""
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f'{where} has no "{key}" path ({_short(entry)}) — each entry needs "{key}": "<path>"')
    path = folder / value
    if not path.is_file():
        if required:
            raise UserError(f"{where}: listed file {path} not found")
        return None
    return path


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool)) or value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _folder_rows(folder: Path, modality: str) -> list[dict]:
    """Every volume file, and every DICOM series (a folder with several gives one row per series)."""
    found: list[tuple[Path, str | None]] = []
    for path in [folder, *sorted(folder.rglob("*"))]:  # the folder itself may be the DICOM series
        if path.name.startswith("."):
            continue
        if path.is_file() and path.name.endswith(VOLUME_SUFFIXES):
            found.append((path, None))
        elif path.is_dir():
            uids = dicom_series(path)
            found += [(path, uid if len(uids) > 1 else None) for uid in uids]
    rows, seen = [], set()
    for path, uid in found:
        case = str(path.relative_to(folder)).replace("/", "_") if path != folder else folder.name
        case = volume_stem(Path(case)) if path.is_file() else case + (f"_{uid}" if uid else "")
        if case in seen:
            raise UserError(f"{path}: two images give the case id {case!r} — rename one")
        seen.add(case)
        rows.append({"id": case, "image": path, "label": None, "modality": modality, "split": "", "series_uid": uid})
    return rows


def _assign_splits(rows: list[dict], val_fraction: float, folds: int | None, seed: int) -> None:
    """Training rows (split "") → train/val by case, and fold numbers; seeded and order-independent."""
    pool = sorted((r for r in rows if r["split"] == ""), key=lambda r: r["id"])
    random.Random(seed).shuffle(pool)
    n_val = round(val_fraction * len(pool))
    if val_fraction > 0 and len(pool) >= 2:
        n_val = max(1, min(n_val, len(pool) - 1))
    for i, row in enumerate(pool):
        row["split"] = "val" if i < n_val else "train"
    if folds:
        train = [r for r in pool if r["split"] == "train"]
        if len(train) < folds:
            raise UserError(f"--folds {folds}: only {len(train)} training cases")
        for i, row in enumerate(train):
            row["fold"] = i % folds
