"""Helpers every benchmark shares: timing, peak memory in fresh subprocesses, the result schema, the machine.

Every benchmark returns entries ``{"value": float | None, "goal": str, "met": bool | None, "detail": {...}}``
(``goal`` like ``"<= 1.05"``, ``">= 10"`` or ``"report"``). Absolute times on these shared 2-core machines
are noisy; the goals are ratios of loops measured side by side in one process (or, for memory, in fresh
subprocesses of the same script).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
GIB = 1024**3


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads() -> None:
    """One torch thread per available core, as ``samadapt.training.make_accelerator`` does."""
    import torch

    torch.set_num_threads(cores())


def entry(value: float | None, goal: str, detail: dict[str, Any]) -> dict[str, Any]:
    """A result entry; ``met`` is decided from ``goal`` (``<= x`` / ``>= x``), None for reports or no value."""
    met = None
    if value is not None and goal != "report":
        op, bound = goal.split()
        met = value <= float(bound) if op == "<=" else value >= float(bound)
    return {"value": None if value is None else round(float(value), 4), "goal": goal, "met": met, "detail": detail}


def step_times(step: Callable[[], None], steps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far: ``VmHWM`` of /proc/self/status.

    Not ``ru_maxrss``: Linux carries a parent's peak over fork + exec into the child's ``ru_maxrss``, so a
    subprocess of a large parent would report the parent's peak (measured: every config read 10.96 GiB)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def current_rss_gib() -> float:
    """Resident set size now (from /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / GIB
    except OSError:
        return peak_rss_gib()


def run_json_subprocess(script: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """``python bench/<script> ARGS`` in a fresh interpreter (its own peak RSS); returns its JSON stdout."""
    result = subprocess.run([sys.executable, str(BENCH_DIR / script), *args], capture_output=True, encoding="utf-8",
                            timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def machine() -> dict[str, Any]:
    """CPU model, usable cores, memory, Python and torch versions."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) * 1024 / GIB, 1)
    except OSError:
        pass
    return {"cpu": model, "cores": cores(), "memory_gib": memory, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def print_json(result: Any) -> None:
    print(json.dumps(result, indent=2))


def quiet_stdout():
    """Send prints of the stages (progress lines) to stderr while a benchmark runs: stdout is the JSON."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)
