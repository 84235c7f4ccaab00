"""Shared fixtures: the real demo MRI (fetched once into the user cache), small manifests built from it,
and a helper that runs the real ``samadapt`` CLI in a subprocess like a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: str | Path | None = None, timeout: float = 600, env: dict | None = None,
            expect: int | None = 0) -> subprocess.CompletedProcess:
    """``samadapt ARGS`` in a subprocess; asserts the exit code unless ``expect`` is None."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "samadapt", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env=full_env)
    if expect is not None:
        assert result.returncode == expect, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: exit 2, one ``error:`` line naming what went wrong, no traceback."""
    assert result.returncode == 2, result.stderr
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


@pytest.fixture(scope="session")
def small_manifests(demo_dir, tmp_path_factory) -> dict[str, Path]:
    """Manifests over the demo's smallest real volumes, for fast stage tests:
    ssl = MNI152 T1 at 2 mm (unlabeled); brain = train MNI152 2 mm, val/test Colin27 (another subject)."""
    folder = tmp_path_factory.mktemp("manifests")
    mni = {"image": str(demo_dir / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"),
           "label": str(demo_dir / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")}
    colin = {"image": str(demo_dir / "ch2.nii.gz"), "label": str(demo_dir / "ch2_brain_mask.nii.gz")}
    rows = {
        "ssl": [{"id": "mni2mm", "image": mni["image"], "label": "", "modality": "MR", "split": "train"}],
        "brain": [{"id": "mni2mm", **mni, "modality": "MR", "split": "train"},
                  {"id": "colin27", **colin, "modality": "MR", "split": "val"},
                  {"id": "colin27_test", **colin, "modality": "MR", "split": "test"}],
    }
    paths = {}
    for name, entries in rows.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(e) + "\n" for e in entries))
    (folder / "labels.json").write_text(json.dumps({"labels": {"background": 0, "brain": 1}}))
    return paths
