"""Run folders: atomic writes, content hashes and the ``stage_output.json`` contract.

Every artifact is written to a temporary name in its final folder and renamed into place, so an
interrupted run leaves either the previous complete file or none. ``stage_output.json`` is written
last: a stage folder without it is incomplete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from samadapt.errors import UserError

STAGE_OUTPUT = "stage_output.json"
RUN_CONFIG = "run_config.json"


# Every temporary samadapt writes is named ``.<final name>.<8 hex or "shared">.samadapt-tmp<final suffixes>``
# (the suffixes stay last: nibabel and SimpleITK choose the format by them). Stale-temporary cleanup deletes
# only names of exactly this shape, so it never touches a user's own ``.tmp`` files.
TEMPORARY_MARK = ".samadapt-tmp"
_TEMPORARY = re.compile(r"\..+\.(?:[0-9a-f]{8}|shared)" + re.escape(TEMPORARY_MARK) + r"(?:\.[^.]+)*")


def temporary_name(final: str | os.PathLike, shared: bool = False) -> Path:
    """A temporary path beside ``final`` that stale-temporary cleanup recognises as samadapt's own.

    ``shared``: the same name in every process (a folder several ranks write into, e.g. a training state)."""
    final = Path(final)
    token = "shared" if shared else secrets.token_hex(4)
    return final.parent / f".{final.name}.{token}{TEMPORARY_MARK}{''.join(final.suffixes)}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` (a file or folder name) is one of :func:`temporary_name`'s."""
    return _TEMPORARY.fullmatch(name) is not None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Use for writers that take a file name (torch.save, nibabel, SimpleITK, safetensors)."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp_path = temporary_name(path)
    # O_EXCL: the random name is never someone else's file; the usual mode of a new file (umask applies)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        failed = failed_write(exc, path)
        if failed is not None:
            raise failed from exc
        raise


# Writers in C++/Rust report a failed write (disk full, quota, file size limit) as their own exception types:
# safetensors as "... I/O error: File too large (os error 27)", torch.save's zip writer without the errno.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def failed_write(exc: BaseException, path: Path) -> OSError | None:
    """An OSError naming ``path`` for a writer's failed write (the CLI prints it as one line), else None."""
    if isinstance(exc, OSError):
        # A failed write() carries no file name; the temp name would mean nothing to the user.
        return OSError(exc.errno, exc.strerror, str(path)) if exc.filename is None and exc.errno else None
    if not isinstance(exc, Exception):
        return None
    message = str(exc)
    if match := _RUST_OS_ERROR.search(message):
        code = int(match.group(1))
        return OSError(code, os.strerror(code), str(path))
    if any(signature in message for signature in _TORCH_WRITE_FAILED):
        return OSError(errno.EIO, "write failed — disk full or file size limit reached?", str(path))
    return None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN written as null, so any JSON reader copes)."""
    return write_text(path, json.dumps(_nan_to_none(obj), indent=2, sort_keys=False) + "\n")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file, or raise a one-line UserError naming ``path`` and what it should have been."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"{path}: not a valid {what}{where}") from None


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) or raise a one-line UserError saying why it cannot be used."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot create output folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: output folder is not writable — choose another out=")
    return path


# sha256 of regular files by (path, size, mtime): the pipeline runner checks a stage's inputs, then the stage
# hashes them again; a multi-GB SAM checkpoint is read once per process.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes; for a folder, of its files' relative names and contents — for a stage
    folder only of ``stage_output.json`` and the artifacts it lists (training states can be gigabytes)."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _FILE_HASHES:
            _FILE_HASHES[memo] = _sha256(path, chunk)
        return _FILE_HASHES[memo]
    return _sha256(path, chunk)


def _sha256(path: Path, chunk: int) -> str:
    digest = hashlib.sha256()
    files = sorted(_files_to_hash(path)) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def _files_to_hash(folder: Path) -> list[Path]:
    record = folder / STAGE_OUTPUT
    if not record.is_file():
        return [p for p in folder.rglob("*") if p.is_file()]
    listed = [folder / name for name in json.loads(record.read_text(encoding="utf-8")).get("artifacts", {}).values()]
    return [record, *(p for entry in listed for p in ([entry] if entry.is_file() else entry.rglob("*"))
                      if p.is_file())]


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
    path = Path(stage_dir) / STAGE_OUTPUT
    if not path.is_file():
        raise UserError(f"{stage_dir}: no {STAGE_OUTPUT} — the stage did not finish (rerun it to resume)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


@dataclass
class StageOutput:
    """What a stage's ``run(config)`` returns: the record also written as ``stage_output.json``."""

    stage: str
    out_dir: Path
    artifacts: dict[str, str]
    metrics: dict[str, Any]
    ok: bool = True


LOCK_FILE = ".samadapt.lock"


@dataclass
class StageRun:
    """A started stage: its start time, the hashes of the inputs it reads and its hold on ``out``."""

    started: float
    inputs: dict[str, dict[str, str] | None]
    lock: Any = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _is_main_process() -> bool:
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
    check_output(stage, out, [p for entry in inputs.values() if entry for p in (entry["path"], *entry.get("files", {}))])
    ensure_writable_dir(out)
    lock = hold_lock(out) if _is_main_process() else None
    (out / STAGE_OUTPUT).unlink(missing_ok=True)
    remove_stale_temporaries(out)
    current = {"stage": stage, "config": to_dict(config), "inputs": inputs}
    previous_path = out / RUN_CONFIG
    if previous_path.is_file() and _without_stage(read_json(previous_path, "run record")) != _without_stage(current):
        if (out / "state").is_dir():
            print(f"{out}: config or inputs changed since the saved training states — starting over")
            shutil.rmtree(out / "state", ignore_errors=True)  # other processes may race here
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
        raise UserError(f"{out}: out= holds the output of a {owner} stage — a {stage} there would overwrite it; "
                        "choose another out=")
    if owner is None and not is_samadapt_folder(out):
        # (a sibling rank's lock and temporaries may already be there)
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not is_temporary(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
            raise UserError(f"{out}: out= already holds files samadapt did not write ({shown}) — choose a new "
                            "or empty folder")


def hold_lock(folder: Path) -> Any:
    """Hold ``folder``'s lock file or raise a UserError saying another run is writing there."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{folder}: another samadapt run is writing to this folder right now — wait for it to "
                        "finish or choose another out=") from None
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
    edited in place is a changed input), whose own hashes are kept under ``"files"`` (resolved path → sha256)."""
    from samadapt.data.manifest import MANIFEST_SUFFIXES, load_manifest

    path = Path(path)
    own = sha256_file(path)
    if not (path.is_file() and path.name.endswith(MANIFEST_SUFFIXES)):
        return {"path": str(path), "sha256": own}

    files = {str(f): sha256_file(f) for case in load_manifest(path) for f in (case.image, case.label) if f}
    digest = hashlib.sha256(own.encode())
    for name, value in sorted(files.items()):
        digest.update(f"\n{name}\0{value}".encode())
    return {"path": str(path), "sha256": digest.hexdigest(), "files": files}


def inputs_unchanged(inputs: dict[str, dict[str, Any] | None]) -> bool:
    """Whether every recorded input still exists with the recorded sha256."""
    return all(entry is None or (Path(entry["path"]).exists() and describe_input(entry["path"])["sha256"] == entry["sha256"])
               for entry in inputs.values())


def finish_stage(stage: str, config: Any, run: StageRun, artifacts: dict[str, str | os.PathLike],
                 metrics: dict[str, Any]) -> StageOutput:
    """Write ``stage_output.json`` (config, input hashes, artifacts relative to out, metrics, wall time)."""
    from samadapt.config import to_dict

    out = Path(config.out)
    relative = {name: os.path.relpath(path, out) for name, path in artifacts.items()}
    write_stage_output(out, {
        "stage": stage, "config": to_dict(config), "inputs": run.inputs, "artifacts": relative,
        "metrics": metrics, "wall_time_s": round(time.time() - run.started, 2),
    })
    run.release()
    return StageOutput(stage=stage, out_dir=out, artifacts=relative, metrics=metrics)
