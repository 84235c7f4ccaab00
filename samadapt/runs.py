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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from samadapt.errors import UserError

STAGE_OUTPUT = "stage_output.json"
RUN_CONFIG = "run_config.json"


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Use for writers that take a file name (torch.save, nibabel, SimpleITK, safetensors)."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual mode of a new file
    tmp_path = Path(tmp)
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


@dataclass
class StageRun:
    """A started stage: its start time and the hashes of the inputs it reads."""

    started: float
    inputs: dict[str, dict[str, str] | None]


def begin_stage(config: Any, **input_paths: str | os.PathLike | None) -> StageRun:
    """Make ``config.out`` usable, mark it incomplete (drop an old record) and hash the inputs.

    Training states in ``out/state/`` are only resumed by the same config *and* the same input files: both
    are kept in ``out/run_config.json`` by the run that wrote the states; anything else discards them."""
    from samadapt.config import to_dict

    out = ensure_writable_dir(config.out)
    (out / STAGE_OUTPUT).unlink(missing_ok=True)
    remove_stale_temporaries(out)
    inputs = input_record(**input_paths)
    current = {"config": to_dict(config), "inputs": inputs}
    previous_path = out / RUN_CONFIG
    if previous_path.is_file() and json.loads(previous_path.read_text(encoding="utf-8")) != current:
        if (out / "state").is_dir():
            print(f"{out}: config or inputs changed since the saved training states — starting over")
            shutil.rmtree(out / "state", ignore_errors=True)  # other processes may race here
    write_json(previous_path, current)
    return StageRun(started=time.time(), inputs=inputs)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files and folders (``.<name>...tmp...``) that a killed earlier run left in
    ``folder``: only those older than this process, so a sibling process's writes in flight are safe."""
    import psutil

    started = psutil.Process().create_time()
    for path in sorted(folder.rglob(".*tmp*"), key=lambda p: len(p.parts)):
        try:
            if path.lstat().st_mtime >= started:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:  # inside a folder removed just before
            continue


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
    return StageOutput(stage=stage, out_dir=out, artifacts=relative, metrics=metrics)
