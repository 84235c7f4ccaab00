"""A plain (non-editable) ``pip install .`` holds the whole product under the ``samadapt`` namespace: no
top-level ``evaluate``/``pretrain``/``finetune`` module, and the packaged pipelines and demo manifests work
from any folder."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_a_non_editable_install_runs_packaged_pipelines_from_anywhere(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=600)
    top_level = {p.name.split("-")[0] for p in target.iterdir() if not p.name.endswith((".dist-info", "__pycache__"))}
    assert top_level == {"samadapt", "bin"} or top_level == {"samadapt"}, top_level
    assert (target / "samadapt" / "pipelines" / "demo.yaml").is_file()
    assert (target / "samadapt" / "data_manifests" / "demo_brain.jsonl").is_file()
    # The installed copy, not the source tree, from a folder that is not the repository
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", "import samadapt.evaluate, samadapt.pipelines; "
                            "print(samadapt.evaluate.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                           encoding="utf-8", check=True)
    assert probe.stdout.strip().startswith(str(target))
    listed = subprocess.run([sys.executable, "-m", "samadapt", "run", "demo", "--dry-run", "--runs-dir",
                             str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, encoding="utf-8")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        "pretrain", "finetune_ssl", "finetune_base", "baseline", "litemedsam_finetune", "evaluate_ssl",
        "evaluate_base", "evaluate_baseline", "litemedsam_zero_shot", "litemedsam_zero_shot_3d", "litemedsam_adapted",
        "litemedsam_adapted_3d"]
