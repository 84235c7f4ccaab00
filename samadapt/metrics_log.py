"""The training loop's log: ``out/metrics.csv`` (one row per ``log_every`` steps, resumable) and TensorBoard."""

from __future__ import annotations

import contextlib
import csv
import io
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from accelerate import Accelerator

from samadapt.io import write_text
from samadapt.keys import TrainKeys
from samadapt.stages import METRICS_FILE, TENSORBOARD_DIR


def _summary_writer(folder: Path, start: int):
    """A TensorBoard SummaryWriter on ``folder``, None without the package (metrics.csv has the same rows).
    ``purge_step`` drops the events a killed run logged after the state it resumes from."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), purge_step=start or None)


class MetricsLog:
    """The rows of ``out/metrics.csv`` (rewritten whole at each row) and their TensorBoard scalars.

    A row: ``step`` (1-based), ``loss`` (mean over micro-batches and processes), ``lr``, ``images_per_s`` (over
    the training time since the previous row: time inside :meth:`paused` is left out) and the loss's logs.
    Every process keeps the rows; only the main one writes them."""

    def __init__(self, out_dir: Path, accelerator: Accelerator, keys: TrainKeys, start: int, desc: str):
        self.path, self.desc, self.main = out_dir / METRICS_FILE, desc, accelerator.is_main_process
        self.images_per_step = keys.batch_size * keys.grad_accumulation * accelerator.num_processes
        self.rows = self._read(start)
        self.board = _summary_writer(out_dir / TENSORBOARD_DIR, start) if keys.tensorboard and self.main else None
        self.window_start, self.window_step = time.perf_counter(), start

    def add(self, step: int, loss: float, lr: float, logs: dict[str, float] | Callable[[], dict[str, float]]) -> dict:
        """Append (and write) the row of ``step``; ``logs`` may be a callable (see ``LossFn``), called here."""
        elapsed = time.perf_counter() - self.window_start
        row = {"step": step, "loss": round(loss, 6), "lr": lr,
               "images_per_s": round(self.images_per_step * (step - self.window_step) / max(elapsed, 1e-9), 3),
               **{k: round(float(v), 6) for k, v in (logs() if callable(logs) else logs).items()}}
        self.rows.append(row)
        self.window_start, self.window_step = time.perf_counter(), step
        if self.main:
            self._write()
            if self.board is not None:
                for name, value in row.items():
                    if name != "step":
                        self.board.add_scalar(f"{self.desc}/{name}", value, step)
        return row

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in this block (validation, previews) does not count towards ``images_per_s``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def _read(self, start: int) -> list[dict[str, Any]]:
        """Rows of a previous run up to the resumed step (later rows belong to the lost part)."""
        if not start or not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return [row for row in csv.DictReader(handle) if int(row["step"]) <= start]

    def _write(self) -> None:
        buffer = io.StringIO()  # the header: every name in the order it first appeared
        writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in self.rows for k in row)))
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, buffer.getvalue())
