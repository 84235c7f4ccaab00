"""The bad-input matrix (issue 10): every mistake a user can make with files, keys and checkpoints, run
through the real CLI in a subprocess — one ``error:`` line naming the file/key and the problem, exit code
≠ 0, no traceback (unless ``--debug``). Also: unsafe loading is absent from the source tree, manifest ids
cannot write outside ``out=``, and an interrupted write (disk full) leaves the previous artifact intact.

The table of cases is mirrored in ``tests/BAD_INPUTS.md`` (copied into the README's troubleshooting)."""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import os
import pickle
import re
import resource
import signal
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO, assert_one_line_error, run_cli

SHAPE = (24, 20, 6)  # x, y, z voxels of the synthetic volumes
AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])  # 1 x 1 x 2.5 mm voxels
TINY = ("arch=vit_tiny", "image_size=256")
SOURCE_FOLDERS = ("samadapt", "pretrain", "finetune", "evaluate", "pipelines")
# Written by the malicious pickle's payload if it ever runs.
MARKER = "pwned_marker.txt"


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _manifest(path: Path, *rows: dict) -> Path:
    text = "".join(json.dumps({"modality": "MR", "split": "train", **row}) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return path


def _dicom_series(folder: Path, uid: str, slices: int, z_mm: list[float] | None = None,
                  orientation: dict[int, str] | None = None, truncate: int | None = None) -> None:
    """A series of ``slices`` 6 x 5 pixel slices 2.5 mm apart, written with SimpleITK. The broken variants:
    ``z_mm`` = other slice positions (a gap, two slices at one position), ``orientation`` = {slice: Image
    Orientation (Patient)} for slices tilted against the others, ``truncate`` = the slice whose file is cut
    in half (an interrupted copy)."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(slices):
        image = sitk.GetImageFromArray(np.full((6, 5), 100 * z, np.int16))
        position = 2.5 * z if z_mm is None else z_mm[z]
        for tag, value in {"0020|000e": uid, "0020|000d": "1.2.3", "0008|0060": "MR",
                           "0020|0032": f"0\\0\\{position}",
                           "0020|0037": (orientation or {}).get(z, "1\\0\\0\\0\\1\\0"),
                           "0020|0013": str(z + 1), "0008|0018": f"{uid}.{z + 1}"}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid}_{z}.dcm"))
        writer.Execute(image)
    if truncate is not None:
        cut = folder / f"{uid}_{truncate}.dcm"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])


def _patched_nifti(source: Path, target: Path, offset: int, fmt: str, *values) -> Path:
    """``source`` (a little-endian .nii.gz) with its header bytes at ``offset`` set to ``struct.pack(fmt, *values)``."""
    raw = bytearray(gzip.decompress(source.read_bytes()))
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    target.write_bytes(gzip.compress(bytes(raw)))
    return target


class _RunsCode:
    """A pickle whose loading would call ``os.system`` (what a booby-trapped checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_checkpoint) -> Path:
    """A folder with one small file per bad input (and good ones to pair them with)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    image = (rng.random(SHAPE) * 100).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[6:18, 5:15, 1:5] = 1
    _nifti(d / "img.nii.gz", image)
    _nifti(d / "lab.nii.gz", label)
    _nifti(d / "lab_empty.nii.gz", np.zeros(SHAPE, np.uint8))
    _nifti(d / "lab_shape.nii.gz", label[:, :16])
    shifted = AFFINE.copy()
    shifted[:3, 3] = (5.0, 0.0, 0.0)
    _nifti(d / "lab_geometry.nii.gz", label, shifted)
    _nifti(d / "lab_float.nii.gz", label.astype(np.float32) * 0.5)
    _nifti(d / "lab_negative.nii.gz", label.astype(np.int16) * -1)
    too_many = label.copy()
    too_many[0, 0, 0] = 4
    _nifti(d / "lab_k5.nii.gz", too_many)
    whole = (d / "img.nii.gz").read_bytes()
    (d / "img_truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (d / "img_garbage.nii.gz").write_bytes(gzip.compress(b"this is not an image " * 40))
    _nifti(d / "img_4d.nii.gz", np.stack([image, image], axis=-1))
    _nifti(d / "img_2d.nii.gz", image[:, :, 0], np.diag([1.0, 1.0, 1.0, 1.0]))
    with_nan = image.copy()
    with_nan[:, :, 3] = np.nan
    with_nan[0, 0, 0] = np.inf
    _nifti(d / "img_nan.nii.gz", with_nan)
    _dicom_series(d / "dicom_two", "1.2.826.0.1.1", 3)
    _dicom_series(d / "dicom_two", "1.2.826.0.1.2", 2)
    _dicom_series(d / "dicom_gap", "1.2.826.0.2", 5, z_mm=[0.0, 2.5, 5.0, 10.0, 12.5])
    _dicom_series(d / "dicom_duplicate", "1.2.826.0.3", 5, z_mm=[0.0, 2.5, 5.0, 5.0, 7.5])
    _dicom_series(d / "dicom_orientation", "1.2.826.0.4", 4, orientation={3: "1\\0\\0\\0\\0\\1"})
    _dicom_series(d / "dicom_truncated", "1.2.826.0.5", 4, truncate=2)
    _patched_nifti(d / "img.nii.gz", d / "img_dim0.nii.gz", 40, "<8h", 3, SHAPE[0], 0, SHAPE[2], 1, 1, 1, 1)
    _patched_nifti(d / "img.nii.gz", d / "img_slope.nii.gz", 112, "<f", 1e38)  # scl_slope: 100 * 1e38 = Inf
    for name, meta in {
        "msd_no_label": {"labels": {"0": "background", "1": "x"}, "training": [{"image": "../img.nii.gz"}]},
        "msd_strings": {"labels": {"0": "background", "1": "x"}, "training": ["../img.nii.gz"]},
        "nnunet_label_list": {"channel_names": {"0": "CT"}, "labels": ["background", "liver"],
                              "file_ending": ".nii.gz"},
    }.items():
        (d / name).mkdir()
        (d / name / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")

    good = {"image": str(d / "img.nii.gz"), "label": str(d / "lab.nii.gz")}
    manifests = {
        "missing_image": [{"id": "a", "image": str(d / "nope.nii.gz"), "label": ""}],
        "truncated": [{"id": "a", "image": str(d / "img_truncated.nii.gz"), "label": ""}],
        "garbage": [{"id": "a", "image": str(d / "img_garbage.nii.gz"), "label": ""}],
        "4d": [{"id": "a", "image": str(d / "img_4d.nii.gz"), "label": ""}],
        "2d": [{"id": "a", "image": str(d / "img_2d.nii.gz"), "label": str(d / "lab.nii.gz")}],
        "shape": [{"id": "a", **good, "label": str(d / "lab_shape.nii.gz")}],
        "geometry": [{"id": "a", **good, "label": str(d / "lab_geometry.nii.gz")}],
        "float_labels": [{"id": "a", **good, "label": str(d / "lab_float.nii.gz")}],
        "negative_labels": [{"id": "a", **good, "label": str(d / "lab_negative.nii.gz")}],
        "k5": [{"id": "a", **good, "label": str(d / "lab_k5.nii.gz")}],
        "nan": [{"id": "a", "image": str(d / "img_nan.nii.gz"), "label": ""}],
        "dicom_two": [{"id": "a", "image": str(d / "dicom_two"), "label": ""}],
        **{name: [{"id": "a", "image": str(d / name), "label": ""}]
           for name in ("dicom_gap", "dicom_duplicate", "dicom_orientation", "dicom_truncated")},
        "dim0": [{"id": "a", "image": str(d / "img_dim0.nii.gz"), "label": ""}],
        "slope": [{"id": "a", "image": str(d / "img_slope.nii.gz"), "label": ""}],
        "modality_xr": [{"id": "a", **good, "modality": "XR"}],
        "duplicate_ids": [{"id": "a", **good}, {"id": "a", **good}],
        "unknown_column": [{"id": "a", **good, "spacing": "1"}],
        "bad_split": [{"id": "a", **good, "split": "training"}],
        "empty_label": [{"id": "full", **good}, {"id": "blank", "image": good["image"],
                                                 "label": str(d / "lab_empty.nii.gz")}],
        "escape": [{"id": "../../escape", **good, "split": "test"}],
    }
    for name, rows in manifests.items():
        _manifest(d / f"{name}.jsonl", *rows)
    (d / "empty.jsonl").write_text("\n", encoding="utf-8")
    (d / "bad_json.jsonl").write_text('{"id": "a", "image": "img.nii.gz"\n', encoding="utf-8")
    (d / "manifest.txt").write_text((d / "duplicate_ids.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    (d / "latin1.csv").write_bytes("id,image,label,modality,split\nmüller,img.nii.gz,,MR,\n".encode("latin-1"))

    (d / "unknown_key.yaml").write_text("arch: vit_tiny\nlearning_rate: 0.1\n", encoding="utf-8")
    (d / "bad_yaml.yaml").write_text("arch: vit_tiny\n  lr: [0.1\n", encoding="utf-8")
    whole = tiny_checkpoint.read_bytes()
    (d / "truncated.pth").write_bytes(whole[: len(whole) // 3])
    (d / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    torch.save({"model": _RunsCode(d / MARKER)}, d / "evil.pth")  # a zip checkpoint, as torch.save writes
    with open(d / "evil_plain.pth", "wb") as handle:  # an old-style plain pickle
        pickle.dump(_RunsCode(d / MARKER), handle)
    torch.save({"weight": torch.zeros(2, 2)}, d / "not_sam.pth")
    return d


@dataclass(frozen=True)
class Case:
    """One row of the matrix: CLI arguments (``{d}`` = the fixture folder, ``{ckpt}`` = a tiny SAM .pth)
    and the fragments the one ``error:`` line must contain."""

    name: str
    args: tuple[str, ...]
    says: tuple[str, ...]


def _check(manifest: str, *extra: str) -> tuple[str, ...]:
    return ("data", "check", f"{{d}}/{manifest}.jsonl", *extra)


MATRIX = [
    Case("missing manifest", ("data", "check", "{d}/nope.jsonl"), ("nope.jsonl", "manifest not found")),
    Case("missing image file", _check("missing_image"), ("nope.nii.gz", "not found")),
    Case("truncated .nii.gz", _check("truncated", "num_classes=2"), ("img_truncated.nii.gz", "truncated")),
    Case("corrupt .nii.gz (not an image)", _check("garbage", "num_classes=2"),
         ("img_garbage.nii.gz", "cannot read the header")),
    Case("4D image without channel=", _check("4d", "num_classes=2"),
         ("img_4d.nii.gz", "4D image with 2 volumes", "channel=")),
    Case("2D image", _check("2d", "num_classes=2"), ("lab.nii.gz", "shape")),
    Case("image/label shape mismatch (headers only)", _check("shape"),
         ("lab_shape.nii.gz", "label shape", "differs from image")),
    Case("image/label shape mismatch", _check("shape", "num_classes=2"),
         ("lab_shape.nii.gz", "label shape", "differs from image", "resample_labels=true")),
    Case("image/label geometry mismatch", _check("geometry", "num_classes=2"),
         ("lab_geometry.nii.gz", "geometry", "differs from image")),
    Case("image/label geometry mismatch (header-only check)", _check("geometry"),
         ("lab_geometry.nii.gz", "geometry", "differs from image", "resample_labels=true")),
    Case("float labels", _check("float_labels", "num_classes=2"),
         ("lab_float.nii.gz", "non-integer values (e.g. 0.5)")),
    Case("negative labels", _check("negative_labels", "num_classes=2"),
         ("lab_negative.nii.gz", "include negatives")),
    Case("labels >= num_classes", _check("k5", "num_classes=2"),
         ("lab_k5.nii.gz", "num_classes=2", "set num_classes=5")),
    Case("NaN/Inf voxels", _check("nan", "num_classes=2"),
         ("img_nan.nii.gz", "NaN/Inf voxels", "slices z=3")),
    Case("DICOM folder with two series", _check("dicom_two"),
         ("dicom_two", "2 DICOM series", "series_uid")),
    Case("DICOM series with a missing slice", _check("dicom_gap"),
         ("dicom_gap", "slice positions jump from 5.0 to 10.0 mm (missing slice?)", "2.5 mm apart")),
    Case("DICOM series with two slices at one position", _check("dicom_duplicate"),
         ("dicom_duplicate", "two slices at 5.0 mm", "remove the duplicate")),
    Case("DICOM series with mixed orientations", _check("dicom_orientation"),
         ("dicom_orientation", "different orientations", "1\\0\\0\\0\\0\\1")),
    Case("DICOM series with a truncated slice file", _check("dicom_truncated"),
         ("dicom_truncated", "1.2.826.0.5_2.dcm", "cannot be read (truncated or corrupt?)")),
    Case("NIfTI header with a 0 in its dims", _check("dim0"),
         ("img_dim0.nii.gz", "dims (24, 0, 6) include 0", "re-export")),
    Case("NIfTI scl_slope that overflows (headers only)", _check("slope"),
         ("img_slope.nii.gz", "scl_slope=1e+38", "beyond float32", "set_slope_inter")),
    Case("unknown modality", _check("modality_xr"), ("modality_xr.jsonl", "row 1: unknown modality 'XR'", "MR or CT")),
    Case("manifest that is not .jsonl/.csv", ("data", "check", "{d}/manifest.txt"),
         ("manifest.txt", "manifests end in .jsonl or .csv")),
    Case("manifest not in UTF-8", ("data", "check", "{d}/latin1.csv"),
         ("latin1.csv", "not UTF-8 text", "line 2", "save it as UTF-8")),
    Case("data import out=<a folder>", ("data", "import", "{d}/msd_no_label", "out={d}"),
         ("is a folder", "manifest.jsonl")),
    Case("data import out= without .jsonl/.csv", ("data", "import", "{d}/msd_no_label", "out={d}/m.txt"),
         ("m.txt", "must end in .jsonl or .csv")),
    Case("Decathlon training entry without a label", ("data", "import", "{d}/msd_no_label", "out={d}/o.jsonl"),
         ("msd_no_label/dataset.json", 'training entry 1 has no "label"')),
    Case("Decathlon training entries as strings", ("data", "import", "{d}/msd_strings", "out={d}/o.jsonl"),
         ("msd_strings/dataset.json", 'training entry 1 is "../img.nii.gz", not {"image": ..., "label": ...}')),
    Case("nnU-Net labels as a list", ("data", "import", "{d}/nnunet_label_list", "out={d}/o.jsonl"),
         ("nnunet_label_list/dataset.json", "labels must be a mapping", "not a list")),
    Case("empty manifest", _check("empty"), ("empty.jsonl", "empty manifest")),
    Case("manifest line not JSON", _check("bad_json"), ("bad_json.jsonl", "line 1 is not valid JSON")),
    Case("duplicate case ids", _check("duplicate_ids"), ("duplicate_ids.jsonl", "duplicate id 'a'")),
    Case("unknown manifest column", _check("unknown_column"), ("unknown_column.jsonl", "unknown column(s) spacing")),
    Case("unknown split", _check("bad_split"), ("bad_split.jsonl", "unknown split 'training'")),
    Case("case id escaping out=", _check("escape"), ("escape.jsonl", "'../../escape'", "not a plain file name")),
    Case("unknown config key", ("finetune", "data=x.jsonl", "out=o", "num_classes=2", "learning_rate=0.1"),
         ("learning_rate", "did you mean")),
    Case("unknown key in a YAML config", ("finetune", "--config", "{d}/unknown_key.yaml", "data=x", "out=o",
                                          "num_classes=2"), ("learning_rate",)),
    Case("invalid YAML", ("finetune", "--config", "{d}/bad_yaml.yaml"), ("bad_yaml.yaml", "not valid YAML")),
    Case("wrong type for a key", ("finetune", "data=x.jsonl", "out=o", "num_classes=2", "steps=ten"),
         ("steps", "ten")),
    Case("mixed_precision=fp16 on a CPU", ("finetune", "data={d}/empty_label.jsonl", "out={d}/runs/fp16",
                                           "num_classes=2", "steps=1", "val_split=none", "cache_dir={d}/cache",
                                           *TINY, "mixed_precision=fp16"),
         ("mixed_precision=fp16 needs a CUDA GPU", "bf16")),
    Case("export_merged that cannot be merged", ("finetune", "data=x.jsonl", "out=o", "num_classes=2",
                                                 "export_merged=true"),
         ("export_merged=true needs prompt=box|point",)),
    Case("value not among the choices", ("finetune", "data=x.jsonl", "out=o", "num_classes=2", "encoder=lorra"),
         ("encoder", "lorra")),
    Case("checkpoint of another arch", ("checkpoint", "info", "{ckpt}", "arch=vit_b"),
         ("looks like vit_tiny", "arch=vit_b")),
    Case("not a SAM checkpoint", ("checkpoint", "info", "{d}/not_sam.pth", "arch=vit_tiny"),
         ("not_sam.pth", "not a SAM checkpoint")),
    Case("truncated .pth checkpoint", ("checkpoint", "info", "{d}/truncated.pth"),
         ("truncated.pth", "truncated or corrupt")),
    Case("truncated .safetensors checkpoint", ("checkpoint", "info", "{d}/truncated.safetensors"),
         ("truncated.safetensors", "truncated or corrupt")),
    Case("checkpoint that would execute code", ("checkpoint", "info", "{d}/evil.pth"),
         ("evil.pth", "refusing to execute code", "it calls posix.system")),
    Case("plain pickle that would execute code", ("checkpoint", "info", "{d}/evil_plain.pth"),
         ("evil_plain.pth", "refusing to execute code")),
]


def _expand(text: str, d: Path, ckpt: Path) -> str:
    return text.replace("{d}", str(d)).replace("{ckpt}", str(ckpt))


@pytest.mark.parametrize("case", MATRIX, ids=[c.name for c in MATRIX])
def test_bad_input_is_one_line_error(case, bad, tiny_checkpoint):
    result = run_cli(*(_expand(a, bad, tiny_checkpoint) for a in case.args), expect=None,
                     in_process=True)
    assert_one_line_error(result, *(_expand(s, bad, tiny_checkpoint) for s in case.says))
    assert not (bad / MARKER).exists(), "the pickle's payload ran"


def test_the_fixes_the_errors_suggest_work(bad, tiny_checkpoint):
    """`channel=` for a 4D image and `resample_labels=true` for another label grid make `data check` pass."""
    for manifest, extra in (("4d", ("num_classes=2", "channel=1")), ("geometry", ("resample_labels=true",)),
                            ("geometry", ("num_classes=2", "resample_labels=true"))):
        result = run_cli("data", "check", bad / f"{manifest}.jsonl", *extra)
        assert "1 cases ok" in result.stdout, result.stdout
    typo = run_cli("data", "check", bad / "4d.jsonl", "chanel=1", expect=None)
    assert_one_line_error(typo, "chanel", "did you mean channel")


def test_the_booby_trapped_pickles_do_run_code_when_unpickled(tmp_path):
    """The payloads are real: plain unpickling runs them (so "marker not created" above means something)."""
    torch.save({"model": _RunsCode(tmp_path / "zip_ran")}, tmp_path / "evil.pth")
    with zipfile.ZipFile(tmp_path / "evil.pth") as archive:
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "plain_ran")))
    assert (tmp_path / "zip_ran").is_file() and (tmp_path / "plain_ran").is_file()


def test_debug_shows_the_traceback(bad):
    result = run_cli("--debug", "data", "check", str(bad / "duplicate_ids.jsonl"), expect=None)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError" in result.stderr and "duplicate id 'a'" in result.stderr


def _finetune_args(bad: Path, out: Path) -> tuple[str, ...]:
    """One step of the tiny model with a frozen encoder: the cheapest training run that reads labels."""
    return ("finetune", f"data={bad / 'empty_label.jsonl'}", f"out={out}", "num_classes=2", "steps=1",
            "val_split=none", f"cache_dir={bad / 'cache'}", "encoder=frozen", *TINY)


@pytest.fixture(scope="module")
def finetuned(bad) -> tuple[subprocess.CompletedProcess, Path]:
    """Training on a manifest where case 'blank' has an all-background label map (and 'full' has a label)."""
    out = bad / "runs" / "empty_label"
    return run_cli(*_finetune_args(bad, out)), out


def test_empty_label_volume_warns_and_training_goes_on(finetuned):
    result, out = finetuned
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert "lab_empty.nii.gz" in warnings[0] and "'blank'" in warnings[0] and "empty" in warnings[0]
    assert "Traceback" not in result.stderr
    assert json.loads((out / "stage_output.json").read_text(encoding="utf-8"))["metrics"]["steps"] == 1


# --- safe loading (part 4) -----------------------------------------------------------------------------

def _python_sources() -> list[Path]:
    return [p for folder in SOURCE_FOLDERS for p in sorted((REPO / folder).rglob("*.py"))]


def _calls(source: str, name: str) -> list[str]:
    """Full text of every ``name(...)`` call in ``source`` (balanced parentheses, so multi-line calls count)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", source):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        calls.append(source[match.start():end + 1])
    return calls


def test_no_unsafe_loading_in_the_source_tree():
    sources = _python_sources()
    assert len(sources) > 30 and any(p.parts[-2] == "evaluate" for p in sources)
    unsafe, torch_loads = [], 0
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for call in _calls(text, "torch.load"):
            torch_loads += 1
            if not re.search(r"weights_only\s*=\s*True", call):
                unsafe.append(f"{path.relative_to(REPO)}: {call}")
        for risky in ("yaml.load", "yaml.load_all", "yaml.full_load", "yaml.unsafe_load", "pickle.load",
                      "pickle.loads", "torch.serialization.load"):
            unsafe += [f"{path.relative_to(REPO)}: {call}" for call in _calls(text, risky)]
        # an alias would hide a call from the scan above
        alias = r"\s*from\s+(torch|yaml|pickle)\s+import\s+.*\b(load|load_all|full_load|unsafe_load)\b"
        unsafe += [f"{path.relative_to(REPO)}: {line.strip()}" for line in text.splitlines() if re.match(alias, line)]
    assert torch_loads >= 1  # the scan sees the checkpoint loader, so it would see a bad call too
    assert not unsafe, "\n".join(unsafe)


def test_the_scan_catches_unsafe_calls():
    source = 'x = torch.load(\n    path, map_location="cpu")\ny = torch.load(p, weights_only=True)\nyaml.load(s)\n'
    calls = _calls(source, "torch.load")
    assert [bool(re.search(r"weights_only\s*=\s*True", c)) for c in calls] == [False, True]
    assert _calls(source, "yaml.load") == ["yaml.load(s)"]


def test_manifest_ids_cannot_write_outside_out(bad, tiny_checkpoint, finetuned):
    out = bad / "runs" / "escape" / "out"
    evaluate = run_cli("evaluate", f"model={tiny_checkpoint}", f"data={bad / 'escape.jsonl'}", f"out={out}",
                       "prompt=box", "num_classes=2", *TINY, expect=None)
    assert_one_line_error(evaluate, "escape.jsonl", "'../../escape'", "not a plain file name")
    predict = run_cli("predict", f"model={finetuned[1]}", f"input={bad / 'escape.jsonl'}", f"out={out}",
                      expect=None)
    assert_one_line_error(predict, "escape.jsonl", "'../../escape'", "not a plain file name")
    escaped = [p for p in bad.rglob("*escape*") if p.is_file() and p.name != "escape.jsonl"]
    assert not escaped, escaped


# --- output folders and disk full (parts 1 and 2) ----------------------------------------------------

def _run(*args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    """``samadapt ARGS`` with a ``preexec_fn`` (run_cli has none): limits and privileges of the child only."""
    return subprocess.run([sys.executable, "-m", "samadapt", *map(str, args)], capture_output=True, encoding="utf-8",
                          timeout=300, preexec_fn=preexec_fn, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _without_root_override() -> None:
    """Make a root child obey file permission bits: drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the
    capability bounding set before exec (root's exec'd program then lacks them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_output_folder(bad):
    read_only = bad / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        preexec = _without_root_override if os.geteuid() == 0 else None
        result = _run(*_finetune_args(bad, read_only / "run"), preexec_fn=preexec)
        assert_one_line_error(result, str(read_only / "run"), "cannot create output folder", "Permission denied")
    finally:
        read_only.chmod(0o755)
    assert list(read_only.iterdir()) == []


def _disk_full(limit_bytes: int):
    """A preexec_fn: files can grow to ``limit_bytes`` only; larger writes fail with EFBIG (like a full disk)
    instead of killing the process with SIGXFSZ."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return limit


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_full_keeps_the_previous_artifact(bad, tiny_checkpoint):
    """torch.save's writer fails mid-file: the previous complete checkpoint stays, no temp file is left."""
    folder = bad / "disk_full"
    folder.mkdir()
    target = folder / "sam.pth"
    target.write_bytes(tiny_checkpoint.read_bytes())  # the complete artifact of an earlier run
    before = _sha256(target)
    result = _run("checkpoint", "convert", tiny_checkpoint, target, preexec_fn=_disk_full(1 << 20))
    assert_one_line_error(result, str(target), "write failed", "disk full", exit_code=1)
    assert _sha256(target) == before
    assert [p.name for p in folder.iterdir()] == [target.name]


def test_disk_full_while_saving_a_training_state_is_one_line_and_leaves_no_state(bad, tiny_checkpoint, finetuned):
    """accelerate's save_state fails (EFBIG) at the first state: one line naming the state, no state folder
    (complete or half-written) that a rerun would resume from."""
    out = bad / "runs" / "state_disk_full"
    args = [a for a in _finetune_args(bad, out) if not a.startswith(("steps=", "checkpoint="))]
    result = _run(*args, "steps=2", "save_every=1", f"checkpoint={tiny_checkpoint}",
                  preexec_fn=_disk_full(1 << 20))
    line = assert_one_line_error(result, str(out / "state" / "step_1"), exit_code=1)
    assert "File too large" in line, line
    assert not (out / "stage_output.json").exists()
    assert not (out / "state").exists() or not list((out / "state").iterdir())


def test_disk_full_during_a_stage_leaves_no_complete_looking_output(bad):
    """safetensors' writer fails (EFBIG) inside finetune: no stage_output.json, no artifact under its final
    name, no temp file."""
    out = bad / "runs" / "disk_full"
    result = _run(*_finetune_args(bad, out), preexec_fn=_disk_full(1 << 20))
    line = assert_one_line_error(result, str(out), exit_code=1)
    assert "File too large" in line, line
    assert not (out / "stage_output.json").exists()
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert not [name for name in files if name.endswith((".safetensors", ".pth")) or ".tmp" in name], files
