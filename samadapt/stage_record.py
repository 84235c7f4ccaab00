"""The stage record: ``stage_output.json``, input hashes, the resume/force policy and the folder rules.

Every stage folder ends with ``stage_output.json``, written last and atomically; a folder without it is
incomplete. ``run_config.json`` (written first) records the config and inputs that the training states in
``state/step_<N>/`` belong to. A stage claims its ``out=`` before it changes anything there: it refuses a folder
that is an input of the run or holds one, another stage's output or a folder of files samadapt did not write, and
it holds the folder's lock while it runs. It then deletes only what it can prove it wrote: its old record, its
own training states when the config changed, and temporaries of exactly samadapt's naming.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samadapt.errors import UserError
from samadapt.io import ensure_writable_dir, is_temporary, read_json, sha256_file, sha256_files, write_json
from samadapt.stages import STAGES, STATE_DIR

STAGE_OUTPUT = "stage_output.json"
RUN_CONFIG = "run_config.json"
PROGRESS_FILE = "progress.json"  # inside each state/step_<N>/: the step and the stateful objects
LOCK_FILE = ".samadapt.lock"


def state_folder(out: str | os.PathLike, step: int) -> Path:
    """``out/state/step_<step>/``: one resumable training state."""
    return Path(out) / STATE_DIR / f"step_{step}"


def saved_states(out: str | os.PathLike) -> list[Path]:
    """Complete training states of the stage folder ``out`` (renamed into place), oldest first."""
    root = Path(out) / STATE_DIR
    if not root.is_dir():
        return []
    states = [p for p in root.glob("step_*") if (p / PROGRESS_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(states, key=lambda p: int(p.name[5:]))


REPRODUCIBILITY_PACKAGES = ("torch", "torchvision", "segment-anything", "mobilesam-mirror", "timm", "lightly",
                            "peft", "monai", "accelerate", "numpy", "scipy", "nibabel", "SimpleITK", "safetensors")


def versions() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced: python, samadapt and the stack it runs on."""
    from importlib import metadata

    import torch

    import samadapt

    found = {"samadapt": samadapt.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in REPRODUCIBILITY_PACKAGES[1:]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_stage_output(out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``out_dir/stage_output.json`` last and atomically; ``versions`` are added."""
    return write_json(Path(out_dir) / STAGE_OUTPUT, {**record, "versions": versions()})


def read_stage_output(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a finished stage's record, or raise a UserError naming what is missing."""
    if not (Path(stage_dir) / STAGE_OUTPUT).is_file():
        raise UserError(f"{stage_dir}: no {STAGE_OUTPUT} — the stage did not finish (rerun it to resume)")
    record = read_json(Path(stage_dir) / STAGE_OUTPUT, "stage record")
    if not isinstance(record, dict):
        raise UserError(f"{Path(stage_dir) / STAGE_OUTPUT}: not a stage record (expected a JSON object)")
    return record


@dataclass
class StageOutput:
    """What a stage's ``run(config)`` returns: the record also written as ``stage_output.json``."""

    stage: str
    out_dir: Path
    artifacts: dict[str, str]
    metrics: dict[str, Any]
    ok: bool = True


@dataclass
class StageRun:
    """A started stage: its start time, the hashes of the inputs it reads and its hold on ``out``."""

    started: float
    inputs: dict[str, dict[str, str] | None]
    lock: Any = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` (or a plain process): the one that claims and cleans ``out``."""
    return os.environ.get("RANK", "0") == "0"


def begin_stage(stage: str, config: Any, **input_paths: str | os.PathLike | None) -> StageRun:
    """Claim ``config.out`` for ``stage``, mark it incomplete (drop its old record) and hash the inputs.

    Nothing is deleted before ``out`` is proven to be this stage's own folder (see :func:`check_output`).
    Training states in ``out/state/`` are only resumed by the same config *and* the same input files: both
    are kept in ``out/run_config.json`` by the run that wrote the states; anything else discards them."""
    from samadapt.config import to_dict

    inputs = input_record(**input_paths)
    out = Path(config.out)
    # Every process checks (all of them delete below); only rank 0 holds the lock for the run.
    input_files = [p for entry in inputs.values() if entry for p in (entry["path"], *entry.get("files", {}))]
    check_output(stage, out, input_files)
    ensure_writable_dir(out)
    lock = hold_lock(out) if is_main_process() else None
    (out / STAGE_OUTPUT).unlink(missing_ok=True)
    remove_stale_temporaries(out)
    current = {"stage": stage, "config": to_dict(config), "inputs": inputs}
    previous_path = out / RUN_CONFIG
    if previous_path.is_file() and _without_stage(read_json(previous_path, "run record")) != _without_stage(current):
        if (out / STATE_DIR).is_dir():
            print(f"{out}: config or inputs changed since the saved training states — starting over")
            discard_states(out)
    write_json(previous_path, current)
    return StageRun(started=time.time(), inputs=inputs, lock=lock)


def _without_stage(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "stage"}  # run_config.json of older versions has no stage


def recorded_stage(folder: Path) -> str | None:
    """The stage that wrote ``folder`` (from its stage_output.json or run_config.json), None if unknown."""
    for name in (STAGE_OUTPUT, RUN_CONFIG):
        path = folder / name
        if path.is_file():
            try:
                stage = json.loads(path.read_text(encoding="utf-8")).get("stage")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                stage = None
            if stage:
                return str(stage)
    return None


def is_samadapt_folder(folder: Path) -> bool:
    """Whether ``folder`` is a folder some samadapt stage wrote (it holds a stage record)."""
    return (folder / STAGE_OUTPUT).is_file() or (folder / RUN_CONFIG).is_file()


def check_output(stage: str, out: Path, input_paths: list[str | os.PathLike] = ()) -> None:
    """Refuse an ``out=`` that is not ``stage``'s to write: an input of the run or a folder holding one, a
    file, another stage's output, or a non-empty folder samadapt did not write. Deletes nothing."""
    target = out.resolve()
    for given in input_paths:
        path = Path(given).resolve()
        if path == target or target in path.parents:
            what = "is an input of this run" if path == target else f"holds an input of this run ({given})"
            raise UserError(f"{out}: out= {what} — choose a separate output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: out= is a file, not a folder — choose a folder for the {stage} output")
    if not out.is_dir():
        return
    owner = recorded_stage(out)
    if owner is not None and owner != stage:
        raise UserError(
            f"{out}: out= holds the output of a {owner} stage — a {stage} there would overwrite it; choose another out="
        )
    if owner is None and not is_samadapt_folder(out):
        # (a sibling rank's lock and temporaries may already be there)
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not is_temporary(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
            raise UserError(
                f"{out}: out= already holds files samadapt did not write ({shown}) — choose a new or empty folder"
            )


def hold_lock(folder: Path) -> Any:
    """Hold ``folder``'s lock file or raise a UserError saying another run is writing there."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{folder}: another samadapt run is writing to this folder right now — wait for it to "
            "finish or choose another out="
        ) from None
    return lock


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporaries (:func:`temporary_name`) that a killed earlier run left in ``folder``: only names
    of that exact shape and only those older than this process, so a sibling process's writes in flight and
    every file samadapt did not name are safe. ``folder`` must already be a stage's own (check_output)."""
    import psutil

    started = psutil.Process().create_time()
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            path = Path(root) / name
            if not is_temporary(name):
                continue
            try:
                if path.lstat().st_mtime >= started:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        dirs[:] = [d for d in dirs if not is_temporary(d)]


def input_record(**paths: str | os.PathLike | None) -> dict[str, dict[str, Any] | None]:
    """``{name: {"path", "sha256"}}`` of a stage's input files/folders (None stays None); see ``describe_input``."""
    for name, p in paths.items():
        if p is not None and not Path(p).exists():
            raise UserError(f"{p}: {name} not found")
    return {name: None if p is None else describe_input(p) for name, p in paths.items()}


def describe_input(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "sha256"}`` of an input. A manifest's sha256 covers the volumes it lists too (an image
    edited in place is a changed input), whose own hashes are kept under ``"files"`` (resolved path → sha256).
    A stage folder's covers its record and every artifact its stage writes (see :func:`stage_folder_files`)."""
    from samadapt.data.formats import MANIFEST_SUFFIXES
    from samadapt.data.manifest import load_manifest

    path = Path(path)
    if path.is_dir():
        files = stage_folder_files(path)
        own = sha256_files(files, path) if files is not None else sha256_file(path)
        return {"path": str(path), "sha256": own}
    own = sha256_file(path)
    if not path.name.endswith(MANIFEST_SUFFIXES):
        return {"path": str(path), "sha256": own}

    files = {str(f): sha256_file(f) for case in load_manifest(path) for f in (case.image, case.label) if f}
    digest = hashlib.sha256(own.encode())
    for name, value in sorted(files.items()):
        digest.update(f"\n{name}\0{value}".encode())
    return {"path": str(path), "sha256": digest.hexdigest(), "files": files}


def stage_folder_files(folder: Path) -> list[Path] | None:
    """The files that make a finished stage folder what it is: its record and every artifact its stage writes
    (from the registry, not from the record's own list, so e.g. a finetune's base weights count), sorted.
    Training states are left out (gigabytes, and not what a downstream stage reads). None: not a stage folder."""
    record = folder / STAGE_OUTPUT
    if not record.is_file():
        return None
    spec = STAGES.get(recorded_stage(folder) or "")
    names = set(spec.artifacts.values()) if spec else set()
    listed = read_json(record, "stage record").get("artifacts", {})
    names |= set(listed.values()) if isinstance(listed, dict) else set()
    entries = [folder / name for name in sorted(names)]
    return [
        record,
        *(
            p
            for entry in entries
            if entry.exists()
            for p in ([entry] if entry.is_file() else sorted(entry.rglob("*")))
            if p.is_file()
        ),
    ]


def inputs_unchanged(inputs: dict[str, dict[str, Any] | None]) -> bool:
    """Whether every recorded input still exists with the recorded sha256."""
    return all(
        entry is None or (Path(entry["path"]).exists() and describe_input(entry["path"])["sha256"] == entry["sha256"])
        for entry in inputs.values()
    )


def discard_states(out: Path) -> None:
    """Drop ``out``'s training states: the next run starts over (``--force``, or a changed config)."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # other processes may race here


def stage_status(stage: str, config: Any) -> str:
    """``up to date`` (same config and input hashes as the finished record), ``resume`` (training states
    written with the same config and inputs) or ``run``."""
    from samadapt.config import to_dict

    out = Path(config.out)
    current = to_dict(config)
    for name, status in ((STAGE_OUTPUT, "up to date"), (RUN_CONFIG, "resume")):
        path = out / name
        if status == "resume" and not saved_states(out):
            break
        if path.is_file() and recorded_stage(out) in (stage, None):
            record = read_json(path, "stage record")
            if record.get("config") == current and inputs_unchanged(record.get("inputs", {})):
                return status
    return "run"


def finish_stage(
    stage: str, config: Any, run: StageRun, artifacts: dict[str, str | os.PathLike], metrics: dict[str, Any]
) -> StageOutput:
    """Write ``stage_output.json`` (config, input hashes, artifacts relative to out, metrics, wall time)."""
    from samadapt.config import to_dict

    out = Path(config.out)
    relative = {name: os.path.relpath(path, out) for name, path in artifacts.items()}
    write_stage_output(
        out,
        {
            "stage": stage,
            "config": to_dict(config),
            "inputs": run.inputs,
            "artifacts": relative,
            "metrics": metrics,
            "wall_time_s": round(time.time() - run.started, 2),
        },
    )
    run.release()
    return StageOutput(stage=stage, out_dir=out, artifacts=relative, metrics=metrics)
