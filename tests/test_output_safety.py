"""``out=`` is never trusted (issue 18, root cause 1): a stage deletes only what it can prove it wrote, refuses an
output folder that belongs to another stage, to the user or to the run's inputs, holds one lock per folder, and
predict never overwrites an input or writes two masks onto one name. Every case runs the real CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from filelock import FileLock

from conftest import assert_one_line_error, run_cli

TINY = ("arch=vit_tiny", "image_size=256")
SHAPE = (32, 32, 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic 32 x 32 x 8 volumes with a box label and a manifest using them for train and test."""
    d = tmp_path_factory.mktemp("out_safety")
    rng = np.random.default_rng(0)
    image = (rng.random(SHAPE) * 100).astype(np.float32)
    image[8:24, 8:24, 2:6] += 200
    label = np.zeros(SHAPE, np.uint8)
    label[8:24, 8:24, 2:6] = 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(d / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(d / "lab.nii.gz"))
    rows = [{"id": "a", "image": "img.nii.gz", "label": "lab.nii.gz", "modality": "MR", "split": split}
            for split in ("train", "test")]
    rows[1]["id"] = "b"
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def model(data) -> Path:
    """A one-step automatic-mode fine-tune (frozen encoder): a real finetune folder for predict/evaluate."""
    out = data / "finetune"
    run_cli("finetune", f"data={data / 'm.jsonl'}", f"out={out}", "num_classes=2", "steps=1", "val_split=none",
            f"cache_dir={data / 'cache'}", "encoder=frozen", "embedding_cache=false", "batch_size=1", *TINY)
    return out


def _evaluate(ckpt: Path, data: Path, out: Path, expect: int | None = 0):
    return run_cli("evaluate", f"model={ckpt}", f"data={data / 'm.jsonl'}", f"out={out}", "prompt=box",
                   "num_classes=2", f"cache_dir={data / 'cache'}", "overlays=false", *TINY, expect=expect)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _users_folder(root: Path) -> Path:
    """The reported data loss: a user's own `.tmp/` folder and `.draft.tmp.txt`, an hour old."""
    folder = root / "h"
    (folder / ".tmp").mkdir(parents=True)
    (folder / "notes").mkdir()
    (folder / ".tmp" / "a.txt").write_text("keep", encoding="utf-8")
    (folder / "notes" / ".draft.tmp.txt").write_text("keep", encoding="utf-8")
    hour_ago = time.time() - 3600
    for path in (folder / ".tmp" / "a.txt", folder / "notes" / ".draft.tmp.txt", folder / ".tmp", folder / "notes"):
        os.utime(path, (hour_ago, hour_ago))
    return folder


def test_a_failing_command_deletes_nothing_in_an_existing_folder(tmp_path):
    folder = _users_folder(tmp_path)
    before = _snapshot(folder)
    result = run_cli("evaluate", "model=/nope", "data=demo:brain", f"out={folder}", expect=None)
    assert_one_line_error(result, "/nope", "not found")
    assert _snapshot(folder) == before


def test_a_folder_of_the_users_files_is_refused_and_kept(tmp_path, data, tiny_checkpoint):
    folder = _users_folder(tmp_path)
    before = _snapshot(folder)
    assert_one_line_error(_evaluate(tiny_checkpoint, data, folder, expect=None), str(folder),
                          "holds files samadapt did not write", ".tmp")
    assert _snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == [".tmp", "notes"]  # not even a lock file left


def test_out_holding_another_stages_output_is_refused(data, model, tiny_checkpoint):
    before = _snapshot(model)
    assert_one_line_error(run_cli("evaluate", f"model={model}", f"data={data / 'm.jsonl'}", f"out={model}",
                                  f"cache_dir={data / 'cache'}", expect=None),
                          str(model), "is an input of this run")
    assert_one_line_error(_evaluate(tiny_checkpoint, data, model, expect=None), str(model),
                          "holds the output of a finetune stage")
    assert _snapshot(model) == before


def test_out_that_holds_the_inputs_is_refused(data, tiny_checkpoint):
    before = _snapshot(data)
    assert_one_line_error(_evaluate(tiny_checkpoint, data, data.parent, expect=None),
                          "holds an input of this run")
    assert _snapshot(data) == before


def _killed_evaluate_folder(out: Path) -> Path:
    """What an evaluate killed after it started leaves: its run record (no stage_output.json)."""
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"stage": "evaluate", "config": {}, "inputs": {}}),
                                         encoding="utf-8")
    return out


def test_only_samadapts_own_stale_temporaries_are_removed(tmp_path, data, tiny_checkpoint):
    """A killed run's temporaries go; a user's file with a `.tmp` name in a samadapt folder stays."""
    out = _killed_evaluate_folder(tmp_path / "eval")
    (out / "predictions").mkdir()
    stale = out / "predictions" / ".b.nii.gz.0123abcd.samadapt-tmp.nii.gz"
    users = out / ".notes.tmp.txt"
    for path in (stale, users):
        path.write_text("x", encoding="utf-8")
        os.utime(path, (time.time() - 3600,) * 2)
    _evaluate(tiny_checkpoint, data, out)
    assert (out / "stage_output.json").is_file() and (out / "predictions" / "b.nii.gz").is_file()
    assert not stale.exists() and users.read_text(encoding="utf-8") == "x"


def test_one_run_per_output_folder(tmp_path, data, model, tiny_checkpoint):
    out, masks = _killed_evaluate_folder(tmp_path / "eval"), tmp_path / "masks"
    masks.mkdir()
    before = _snapshot(out)
    for folder in (out, masks):
        with FileLock(str(folder / ".samadapt.lock"), timeout=0):  # what a running samadapt holds
            result = (_evaluate(tiny_checkpoint, data, out, expect=None) if folder == out else
                      run_cli("predict", f"model={model}", f"input={data / 'img.nii.gz'}", f"out={masks}", expect=None))
            assert_one_line_error(result, str(folder), "another samadapt run is writing to this folder")
    after = {name: body for name, body in _snapshot(out).items() if name != ".samadapt.lock"}
    assert after == before  # the refused run changed nothing (its run record included)
    assert sorted(p.name for p in masks.iterdir()) == [".samadapt.lock"]


def test_predict_never_overwrites_an_input(tmp_path, data, model):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    scan = inputs / "img.nii.gz"
    scan.write_bytes((data / "img.nii.gz").read_bytes())
    result = run_cli("predict", f"model={model}", f"input={inputs}", f"out={inputs}", expect=None)
    assert_one_line_error(result, str(scan), "would overwrite the input")
    assert scan.read_bytes() == (data / "img.nii.gz").read_bytes()
    assert sorted(p.name for p in inputs.iterdir()) == ["img.nii.gz"]


def test_predict_never_writes_two_masks_onto_one_name(tmp_path, data, model):
    image = sitk.ReadImage(str(data / "img.nii.gz"))
    for pair in (("scan.mhd", "scan.mha"), ("ct.nii.gz", "ct")):
        folder = tmp_path / pair[0].split(".")[0]
        folder.mkdir()
        for name in pair:
            if "." in name:
                sitk.WriteImage(image, str(folder / name))
            else:  # a DICOM series folder next to a NIfTI of the same name (never read: refused before)
                (folder / name).mkdir()
                (folder / name / "1.dcm").write_bytes(b"DICM")
        result = run_cli("predict", f"model={model}", f"input={folder}", f"out={tmp_path / 'out'}", expect=None)
        assert_one_line_error(result, "would be written to this name", pair[0].split(".")[0])
    assert not (tmp_path / "out").exists()


def test_temporary_names_are_recognised_exactly():
    from samadapt.io import is_temporary, temporary_name

    made = temporary_name(Path("out/predictions/case.nii.gz"))
    assert made.parent == Path("out/predictions") and made.name.endswith(".nii.gz") and is_temporary(made.name)
    assert is_temporary(temporary_name(Path("state/step_3"), shared=True).name)
    for users in (".tmp", ".draft.tmp.txt", ".x.12345678.tmp.nii.gz", "a.nii.gz.0123abcd.samadapt-tmp"):
        assert not is_temporary(users), users


def test_sigterm_says_how_to_resume_and_weights_get_the_usual_mode(tmp_path, data):
    """A scheduler's SIGTERM: one line saying what happened and how to go on, exit 143, no completion record;
    the same command then resumes. Weights (safetensors, peft's adapter/) get the mode of any new file."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "ft"
    args = ["finetune", f"data={data / 'm.jsonl'}", f"out={out}", "num_classes=2", "steps=40", "save_every=2",
            "val_split=none", f"cache_dir={data / 'cache'}", "encoder=frozen", "decoder=lora",
            "embedding_cache=false", "batch_size=1", *TINY]
    process = subprocess.Popen([sys.executable, "-m", "samadapt", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, encoding="utf-8")
    deadline = time.time() + 300
    while not (out / "state" / "step_2" / "progress.json").exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "terminated (SIGTERM) — rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert not (out / "stage_output.json").exists()
    run_cli(*args)
    record = json.loads((out / "stage_output.json").read_text(encoding="utf-8"))
    assert record["metrics"]["resumed_from_step"] >= 2
    umask = os.umask(0)
    os.umask(umask)
    for path, usual in ((out / "trainable.safetensors", 0o666), (out / "adapter", 0o777),
                        (out / "adapter" / "adapter_model.safetensors", 0o666)):
        assert path.stat().st_mode & 0o777 == usual & ~umask, (path, oct(path.stat().st_mode))
