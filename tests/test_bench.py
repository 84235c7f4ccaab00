"""``python bench/run.py --quick`` runs every benchmark and writes the documented JSON schema (never timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

KEYS = ("finetune_overhead", "pretrain_overhead", "mae_speedup", "embedding_cache_speedup", "loader_headroom",
        "vit_b_1024_lora_peak_gib", "metrics_share", "predict_slices_per_s")


def test_quick_benchmark_suite_writes_the_schema(tmp_path, demo_dir):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out)],
                            capture_output=True, encoding="utf-8", timeout=900, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    written = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(result.stdout) == written
    for key in KEYS:
        assert key in written, key
    for key, row in written.items():
        assert set(row) == {"value", "goal", "met", "detail"}, key
        assert row["value"] is None or isinstance(row["value"], float), (key, row["value"])
        assert isinstance(row["goal"], str) and row["goal"], key
        assert row["met"] is None or isinstance(row["met"], bool), key
        assert isinstance(row["detail"], dict) and "error" not in row["detail"], (key, row["detail"])
        if row["goal"] != "report":
            assert (row["met"] is None) == (row["value"] is None), key
    assert written["vit_b_1024_lora_peak_gib"]["value"] is None  # a full-run-only benchmark
    table = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert all(f"`{key}`" in table for key in KEYS) and written["machine"]["detail"]["cpu"] in table
