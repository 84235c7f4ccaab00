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
        failed = _failed_write(exc, path)
        if failed is not None:
            raise failed from exc
        raise


# Writers in C++/Rust report a failed write (disk full, quota, file size limit) as their own exception types:
# safetensors as "... I/O error: File too large (os error 27)", torch.save's zip writer without the errno.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def _failed_write(exc: BaseException, path: Path) -> OSError | None:
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes; for a folder, of its files' relative names and contents — for a stage
    folder only of ``stage_output.json`` and the artifacts it lists (training states can be gigabytes)."""
    path = Path(path)
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


def versions() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced."""
    import torch

    import samadapt

    return {"samadapt": samadapt.__version__, "torch": torch.__version__, "python": platform.python_version()}


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
    inputs = input_record(**input_paths)
    current = {"config": to_dict(config), "inputs": inputs}
    previous_path = out / RUN_CONFIG
    if previous_path.is_file() and json.loads(previous_path.read_text(encoding="utf-8")) != current:
        if (out / "state").is_dir():
            print(f"{out}: config or inputs changed since the saved training states — starting over")
            shutil.rmtree(out / "state", ignore_errors=True)  # other processes may race here
    write_json(previous_path, current)
    return StageRun(started=time.time(), inputs=inputs)


def input_record(**paths: str | os.PathLike | None) -> dict[str, dict[str, str] | None]:
    """``{name: {"path", "sha256"}}`` of a stage's input files/folders (None stays None)."""
    for name, p in paths.items():
        if p is not None and not Path(p).exists():
            raise UserError(f"{p}: {name} not found")
    return {name: None if p is None else {"path": str(p), "sha256": sha256_file(p)} for name, p in paths.items()}


def inputs_unchanged(inputs: dict[str, dict[str, str] | None]) -> bool:
    """Whether every recorded input still exists with the recorded sha256."""
    return all(entry is None or (Path(entry["path"]).exists() and sha256_file(entry["path"]) == entry["sha256"])
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
