"""Shared fixtures: the real demo MRI (fetched once into the user cache), small manifests built from it,
and a helper that runs the real ``samadapt`` CLI in a subprocess like a user would."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest workers share the 2 cores: one compute thread each (and in every samadapt subprocess, which
    # honours OMP_NUM_THREADS), since busy-waiting thread pools on oversubscribed cores run ~10x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_cli(*args: str, cwd: str | Path | None = None, timeout: float = 600, env: dict | None = None,
            expect: int | None = 0, in_process: bool | None = None) -> subprocess.CompletedProcess:
    """``samadapt ARGS``; asserts the exit code unless ``expect`` is None.

    ``in_process`` (default: unless ``cwd`` or ``env`` is given) calls ``samadapt.cli.main`` in this process —
    the same parser, handlers, exit codes and stdout/stderr, without ~6 s of imports per call; False runs
    ``python -m samadapt`` in a subprocess (what kill/resume, multi-process and environment tests need)."""
    if in_process is None:
        in_process = cwd is None and env is None
    if in_process:
        assert cwd is None and env is None, "in_process runs in this process's folder and environment"
        result = _run_in_process([str(a) for a in args])
    else:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        result = subprocess.run([sys.executable, "-m", "samadapt", *map(str, args)], cwd=cwd, capture_output=True,
                                encoding="utf-8", timeout=timeout, env=full_env)
    if expect is not None:
        assert result.returncode == expect, (
            f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


# The warning filters of a plain ``python`` (pytest turns more warnings on, which a user never sees).
_INTERPRETER_IGNORES = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    import warnings

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """``samadapt.cli.main(args)`` with stdout/stderr captured, as a CompletedProcess; an uncaught exception
    prints its traceback and exits 1, as the interpreter would. Process-wide state the CLI sets (the SIGTERM
    handler, Accelerate's singleton state) is put back afterwards, so one call cannot leak into the next."""
    import contextlib
    import io
    import traceback
    import warnings

    import torch
    from accelerate.state import AcceleratorState, PartialState

    from samadapt.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    sigterm, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh filter list also re-arms warnings shown once by an earlier call
            warnings.simplefilter("default")
            for category in _INTERPRETER_IGNORES:
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _print_warning  # to our stderr, not into pytest's warning record
            try:
                code = main(args)
            except SystemExit as exc:  # argparse errors, --help, --version
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 — a bug must show as a traceback, as in a subprocess
                traceback.print_exc()
                code = 1
    finally:
        torch.set_num_threads(threads)  # a stage sets its own
        signal.signal(signal.SIGTERM, sigterm)
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    return subprocess.CompletedProcess(["samadapt", *args], code, stdout.getvalue(), stderr.getvalue())


def launch_two_processes(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``samadapt ARGS`` as 2 processes on the CPU (gloo); asserts exit code 0."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "samadapt",
        *map(str, args),
    ]
    result = subprocess.run(
        command, capture_output=True, encoding="utf-8", timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def record_of(folder: Path) -> dict:
    """A finished stage's ``stage_output.json``."""
    return json.loads((folder / "stage_output.json").read_text(encoding="utf-8"))


def losses(out: Path) -> dict[int, float]:
    """{step: loss} from a training stage's ``metrics.csv``."""
    with open(out / "metrics.csv", newline="", encoding="utf-8") as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}


def finetune_args(data: Path, checkpoint, out: Path, **extra) -> list[str]:
    """A tiny, fast ``samadapt finetune`` command line (LoRA encoder, full decoder, automatic masks)."""
    keys = {
        "arch": "vit_tiny",
        "image_size": 256,
        "checkpoint": checkpoint,
        "data": data,
        "out": out,
        "num_classes": 2,
        "steps": 16,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 0,
        "save_every": 8,
        "val_every": 8,
        "log_every": 1,
        "encoder": "lora",
        "decoder": "full",
        "prompt": "none",
        **extra,
    }
    return ["finetune", *(f"{k}={v}" for k, v in keys.items())]


def kill_when(args: list, ready: Path, delay: float = 0.0, timeout: float = 300) -> None:
    """Start ``samadapt ARGS``, SIGKILL it ``delay`` seconds after ``ready`` exists (e.g. a saved training
    state), so the kill lands at an arbitrary point of the following steps, saves or validations."""
    process = subprocess.Popen(
        [sys.executable, "-m", "samadapt", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while not ready.exists():
        assert process.poll() is None, f"samadapt exited ({process.returncode}) before {ready} appeared"
        assert time.time() < deadline, f"{ready} did not appear within {timeout} s"
        time.sleep(0.05)
    time.sleep(delay)
    assert process.poll() is None, f"samadapt finished within {delay} s after {ready} — nothing left to kill"
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, exit_code: int = 2) -> str:
    """One ``error:`` line naming what went wrong, no traceback, and ``exit_code`` (2 = the user's input,
    1 = the environment, e.g. a full disk)."""
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from samadapt.data.demo import ensure_demo_data

    return ensure_demo_data(log=lambda message: None)


def resample_to(source: Path, target: Path, spacing_mm: float, nearest: bool) -> Path:
    """``source`` resampled to isotropic ``spacing_mm`` (same origin and direction), written to ``target``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    size = [max(1, round(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    resampled = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        image.GetOrigin(),
        [spacing_mm] * 3,
        image.GetDirection(),
        0,
        image.GetPixelID(),
    )
    sitk.WriteImage(resampled, str(target))
    return target


@pytest.fixture(scope="session")
def small_manifests(demo_dir, tmp_path_factory) -> dict[str, Path]:
    """Manifests over small real volumes, for fast stage tests: ssl = MNI152 T1 at 2 mm (unlabeled);
    brain = train MNI152 2 mm, val/test Colin27 (another subject) resampled to 2.5 mm."""
    folder = tmp_path_factory.mktemp("manifests")
    mni = {
        "image": str(demo_dir / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"),
        "label": str(demo_dir / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz"),
    }
    colin = {
        "image": str(resample_to(demo_dir / "ch2.nii.gz", folder / "colin27.nii.gz", 2.5, nearest=False)),
        "label": str(
            resample_to(demo_dir / "ch2_brain_mask.nii.gz", folder / "colin27_mask.nii.gz", 2.5, nearest=True)
        ),
    }
    rows = {
        "ssl": [{"id": "mni2mm", "image": mni["image"], "label": "", "modality": "MR", "split": "train"}],
        "brain": [
            {"id": "mni2mm", **mni, "modality": "MR", "split": "train"},
            {"id": "colin27", **colin, "modality": "MR", "split": "val"},
            {"id": "colin27_test", **colin, "modality": "MR", "split": "test"},
        ],
    }
    paths = {}
    for name, entries in rows.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    (folder / "labels.json").write_text(json.dumps({"labels": {"background": 0, "brain": 1}}), encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised vit_tiny SAM saved in the official ``.pth`` layout (stands in for real weights)."""
    import torch

    from samadapt.models.checkpoints import save_sam_checkpoint
    from samadapt.models.registry import build_sam

    torch.manual_seed(7)
    return save_sam_checkpoint(
        build_sam("vit_tiny", 256), "vit_tiny", tmp_path_factory.mktemp("checkpoints") / "sam_vit_tiny_random.pth"
    )
