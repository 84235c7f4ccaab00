"""Manifests: which volumes a stage uses (format in ``data_manifests/README.md``).

JSON Lines or CSV, one case per row: ``id``, ``image``, ``label`` (optional), ``modality`` (MR/CT),
``split`` (train/val/test or empty: split by case when a stage trains, see ``splits``), optional ``fold``
(int, from ``data import --folds``) and ``series_uid`` (DICOM folders with several series). Paths: ``~`` and
``${VAR}`` are expanded (``${SAMADAPT_CACHE}`` defaults to the samadapt cache folder), then relative paths
resolve against the manifest's folder. A sidecar ``<manifest stem>.labels.json`` (or ``labels.json``) names the classes.
Manifests are UTF-8 text (a spreadsheet's byte-order mark is fine); the suffix decides the format.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from samadapt.data.formats import MANIFEST_SUFFIXES, volume_stem
from samadapt.data.normalise import require_modality
from samadapt.errors import UserError
from samadapt.io import cache_root

SPLITS = ("train", "val", "test")
COLUMNS = ("id", "image", "label", "modality", "split", "fold", "series_uid")
# Outputs are named <id><suffix> (e.g. <id>_probabilities.nii.gz): the id leaves room for that within 255 bytes.
MAX_ID_BYTES = 200
DEMO_MANIFESTS = {"brain": "demo_brain.jsonl", "ssl": "demo_ssl.jsonl"}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Case:
    """One volume of a manifest (paths absolute)."""

    id: str
    image: Path
    label: Path | None
    modality: str
    split: str
    fold: int | None = None
    series_uid: str | None = None


def expand_path(text: str, base: Path) -> Path:
    """``${VAR}``/``$VAR`` and ``~`` expanded, relative paths against ``base``; unset variables raise KeyError."""
    def variable(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name == "SAMADAPT_CACHE":
            return str(cache_root())
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    path = Path(_VARIABLE.sub(variable, text)).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def packaged_manifest(name: str) -> Path:
    """Path of a manifest shipped in ``samadapt.data_manifests`` (works for editable and plain installs)."""
    return Path(str(resources.files("samadapt.data_manifests") / name))


def resolve_manifest(arg: str | os.PathLike) -> Path:
    """A manifest path, or ``demo:brain`` / ``demo:ssl`` (fetches the demo data first if needed)."""
    text = str(arg)
    if text.startswith("demo:"):
        name = text[len("demo:"):]
        if name not in DEMO_MANIFESTS:
            names = ", ".join("demo:" + n for n in DEMO_MANIFESTS)
            raise UserError(f"data={text}: unknown demo manifest — use {names}")
        from samadapt.data.demo import ensure_demo_data

        ensure_demo_data()
        return packaged_manifest(DEMO_MANIFESTS[name])
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: manifest not found — give a .jsonl/.csv manifest or demo:brain / demo:ssl")
    check_manifest_suffix(path)
    return path


def check_manifest_suffix(path: Path) -> None:
    """Only ``MANIFEST_SUFFIXES`` files are manifests (and only theirs get their volumes hashed as inputs)."""
    if not path.name.endswith(MANIFEST_SUFFIXES):
        raise UserError(f"{path}: not a manifest file name — manifests end in {' or '.join(MANIFEST_SUFFIXES)} "
                        "(JSON Lines or CSV, see data_manifests/README.md); rename the file")


def read_text(path: Path) -> str:
    """A manifest or sidecar as text: UTF-8, with or without a byte-order mark (as spreadsheets save it)."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}) — save it as "
                        "UTF-8") from None


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` pairs of a JSON Lines or CSV manifest (blank lines skipped)."""
    text = read_text(path)
    rows: list[tuple[int, dict]] = []
    if path.name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            rows.append((reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}))
        return rows
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} must be a JSON object with id, image, label, modality, split")
        rows.append((number, row))
    return rows


def load_manifest(path: str | os.PathLike, split: str | None = None, require_labels: bool = False,
                  fold: int | None = None) -> list[Case]:
    """Validated cases of a manifest; every problem is reported at once in one UserError.

    ``split`` keeps only rows of that split. With ``fold=k`` the ``train`` rows are split by their
    ``fold`` column: ``split="train"`` keeps folds != k, ``split="val"`` keeps fold k."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")
    check_manifest_suffix(path)
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path}: empty manifest — add one row per volume (see data_manifests/README.md)")
    cases, problems, first_row = [], [], {}
    for number, row in rows:
        case = _parse_row(row, number, path.parent, problems)
        if case is None:
            continue
        if case.id in first_row:
            problems.append(f"row {number}: duplicate id {case.id!r} (first in row {first_row[case.id]})")
        first_row.setdefault(case.id, number)
        if require_labels and case.label is None and (split is None or case.split == split):
            problems.append(f"row {number}: case {case.id!r} has no label but this stage needs labels")
        cases.append(case)
    if problems:
        raise UserError(f"{path}: {len(problems)} problem(s) — " + "; ".join(problems))
    selected = select(cases, split, fold)
    if not selected:
        raise UserError(f"{path}: no rows with split={split}" + (f" and fold={fold}" if fold is not None else "")
                        + f" (splits present: {', '.join(sorted({c.split or '(empty)' for c in cases}))})")
    return selected


def select(cases: list[Case], split: str | None, fold: int | None) -> list[Case]:
    """Cases of ``split``, with ``fold`` turning train rows into this fold's train/val parts."""
    if fold is None:
        return [c for c in cases if split is None or c.split == split]
    if split not in ("train", "val"):
        raise UserError(f"fold={fold} needs split=train or split=val")
    from samadapt.data.splits import fold_column_split  # the fold rule lives there (finetune/baseline use it too)

    pool = [c for c in cases if c.split == "train" and c.fold is not None]
    train, val, _ = fold_column_split(pool, fold) if pool else ([], [], 0)
    return val if split == "val" else train


def _parse_row(row: dict, number: int, base: Path, problems: list[str]) -> Case | None:
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        problems.append(f"row {number}: unknown column(s) {', '.join(unknown)} (known: {', '.join(COLUMNS)})")
    values = {k: ("" if row.get(k) is None else str(row.get(k)).strip()) for k in COLUMNS}
    if not values["image"]:
        what = f"label {values['label']} without an image" if values["label"] else "no image"
        problems.append(f"row {number}: {what}")
        return None
    paths = {}
    for column in ("image", "label"):
        if not values[column]:
            continue
        try:
            paths[column] = expand_path(values[column], base)
        except KeyError as exc:
            problems.append(f"row {number}: {column} {values[column]}: environment variable {exc.args[0]} is not set")
            continue
        if not paths[column].exists():
            problems.append(f"row {number}: {column} {paths[column]} not found")
    modality = None
    try:
        modality = require_modality(values["modality"] or "MR", f"row {number}")  # empty: MR
    except UserError as exc:
        problems.append(str(exc))
    if values["split"] and values["split"] not in SPLITS:
        problems.append(f"row {number}: unknown split {values['split']!r} (use {', '.join(SPLITS)} or leave empty)")
    fold = None
    if values["fold"]:
        try:
            fold = int(float(values["fold"]))
        except ValueError:
            problems.append(f"row {number}: fold {values['fold']!r} is not an integer")
    if "image" not in paths:
        return None
    case_id = values["id"] or volume_stem(paths["image"])
    if not _is_plain_name(case_id):
        # Output files are named after the id (predictions/<id>.nii.gz): it must not lead out of out=.
        problems.append(f"row {number}: id {case_id!r} is not a plain file name (no / \\ or ..)")
        return None
    if len(case_id.encode()) > MAX_ID_BYTES:
        problems.append(f"row {number}: id {case_id[:20]!r}… is {len(case_id.encode())} bytes long — output files are "
                        f"named after it (at most {MAX_ID_BYTES}, file systems allow 255): shorten it")
        return None
    return Case(case_id, paths["image"], paths.get("label"), modality or "MR", values["split"], fold,
                values["series_uid"] or None)


def _is_plain_name(case_id: str) -> bool:
    return not any(sep in case_id for sep in ("/", "\\", "\0")) and case_id not in (".", "..")


def load_label_names(manifest_path: str | os.PathLike) -> dict[int, str] | None:
    """Class names from ``<stem>.labels.json`` or ``labels.json`` beside the manifest, or None.

    Accepts nnU-Net's ``{"labels": {"background": 0, "brain": 1}}``, MSD's ``{"labels": {"0": ...}}``
    or a bare mapping of either direction."""
    manifest_path = Path(manifest_path)
    for candidate in (manifest_path.with_name(manifest_path.stem + ".labels.json"),
                      manifest_path.with_name("labels.json")):
        if candidate.is_file():
            try:
                data = json.loads(read_text(candidate))
            except json.JSONDecodeError as exc:
                raise UserError(f"{candidate}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            return label_mapping(data.get("labels", data) if isinstance(data, dict) else data, candidate)
    return None


def label_mapping(data: object, path: Path) -> dict[int, str]:
    """``{class id: name}`` from nnU-Net's ``{"background": 0, ...}`` or MSD's ``{"0": "background", ...}``;
    anything else (a list, region lists, ids that are no integers) is a UserError naming ``path``."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: labels must be a mapping of class names and ids such as "
                        f'{{"background": 0, "liver": 1}}, not a {type(data).__name__}')
    names: dict[int, str] = {}
    for k, v in data.items():
        if str(k).lstrip("-").isdigit():
            names[int(k)] = str(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            names[v] = str(k)
        else:
            raise UserError(f"{path}: label {k!r}: {v!r} is not an integer class id (region lists are not supported)")
    return dict(sorted(names.items()))


def check_manifest_out(path: str | os.PathLike) -> Path:
    """Where a manifest may be written: a ``.jsonl`` or ``.csv`` file name that is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"out={path}: is a folder — give a manifest file name, e.g. out={path / 'manifest.jsonl'}")
    if not path.name.endswith(MANIFEST_SUFFIXES):
        raise UserError(f"out={path}: a manifest must end in {' or '.join(MANIFEST_SUFFIXES)} (JSON Lines or CSV), "
                        f"e.g. out={path.with_name(path.stem + '.jsonl')}")
    return path


def write_manifest(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows atomically as JSON Lines (``.jsonl``) or CSV (``.csv``, UTF-8 without a byte-order mark;
    ``fold``/``series_uid`` columns only if a row has one); paths inside the manifest's folder become relative."""
    from samadapt.io import write_text

    path = check_manifest_out(path)
    required = ("id", "image", "label", "modality", "split")
    table = []
    for row in rows:
        out = {}
        for column in COLUMNS:
            value = row.get(column)
            if column in ("image", "label") and value:
                value = _relative(Path(value), path.parent.resolve())
            if value is not None and value != "" or column in required:
                out[column] = "" if value is None else value
        table.append(out)
    if not path.name.endswith(".csv"):
        return write_text(path, "".join(json.dumps(out) + "\n" for out in table))
    columns = [c for c in COLUMNS if c in required or any(c in out for out in table)]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return write_text(path, buffer.getvalue())


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base)
    except ValueError:  # other drive on Windows
        return str(path.resolve())
