"""File I/O every part of samadapt shares: atomic writes, JSON, content hashes, the cache folder.

A leaf: it imports nothing of the project but :mod:`samadapt.errors`, so the data layer, the model I/O and the
stage record can all use it. Every artifact is written to a temporary name in its final folder and renamed into
place, so an interrupted run leaves either the previous complete file or none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterator

from samadapt.errors import UserError


def cache_root() -> Path:
    """The samadapt cache folder: ``$SAMADAPT_CACHE`` or ``~/.cache/samadapt``."""
    return Path(os.environ.get("SAMADAPT_CACHE") or Path.home() / ".cache" / "samadapt").expanduser()


# Every temporary samadapt writes is named ``.<final name>.<8 hex or "shared">.samadapt-tmp<final suffixes>``
# (the suffixes stay last: nibabel and SimpleITK choose the format by them). Stale-temporary cleanup deletes
# only names of exactly this shape, so it never touches a user's own ``.tmp`` files.
TEMPORARY_MARK = ".samadapt-tmp"
_TEMPORARY = re.compile(r"\..+\.(?:[0-9a-f]{8}|shared)" + re.escape(TEMPORARY_MARK) + r"(?:\.[^.]+)*")


# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def give_usual_mode(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a new file or folder gets under the umask:
    some writers create 0600 files (safetensors), folders made by mkdtemp are 0700, unlike a plain ``open``."""
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~_UMASK)


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
        give_usual_mode(tmp_path)
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


# sha256 by (path, size, mtime): in memory for this process and on disk under <cache>/hashes/ for the next
# ones, so a multi-GB SAM checkpoint or a volume is read once, not once per stage and per pipeline run.
_HASHES: dict[tuple[str, tuple[int, ...]], str] = {}


def sha256_file(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Hex sha256 of a file's bytes; for a folder (a DICOM series) of its files' relative names and contents."""
    path = Path(path).resolve()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    signature = (len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))
    memo = (str(path), signature)
    if memo in _HASHES:
        return _HASHES[memo]
    name = hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json"
    record = Path(cache_dir or cache_root()) / "hashes" / name
    try:
        known = json.loads(record.read_text(encoding="utf-8"))
        if known["path"] == str(path) and tuple(known["signature"]) == signature:
            _HASHES[memo] = known["sha256"]
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_files(files, path if path.is_dir() else None)
    _HASHES[memo] = digest
    try:
        write_json(record, {"path": str(path), "signature": list(signature), "sha256": digest})
    except (OSError, UserError):  # a read-only cache costs a re-hash next time, nothing else
        pass
    return digest


def sha256_files(files: list[Path], root: Path | None = None, chunk: int = 1 << 20) -> str:
    """One sha256 over ``files`` in the given order (with their names relative to ``root`` when given)."""
    digest = hashlib.sha256()
    for file in files:
        if root is not None:
            digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()
