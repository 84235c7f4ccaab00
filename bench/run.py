"""Run every samadapt benchmark on this machine; print one JSON object and write a Markdown table.

    python bench/run.py [--quick] [--out FILE.json] [--only KEY ... [--merge]] [--markdown-only]

Keys (each ``{"value": float | null, "goal": str, "met": bool | null, "detail": {...}}``):
finetune_overhead, pretrain_overhead, mae_speedup, embedding_cache_speedup, loader_headroom,
vit_b_1024_lora_peak_gib, metrics_share, predict_slices_per_s, gpu_estimate_a100_images_per_s, and
``machine`` (goal "report", its detail: CPU, cores, torch, run time). The Markdown table goes to
``RESULTS.md`` beside ``--out``, followed by the hand-written analysis in ``bench/analysis.md``.
``--quick`` (≤ 3 minutes on 2 cores): vit_tiny configs and few steps; vit_b entries are null or skipped.
A benchmark that fails gets value null and its error in ``detail`` and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from common import BENCH_DIR, entry, machine, quiet_stdout, set_threads

KEYS = ("finetune_overhead", "pretrain_overhead", "mae_speedup", "embedding_cache_speedup", "loader_headroom",
        "vit_b_1024_lora_peak_gib", "metrics_share", "predict_slices_per_s", "gpu_estimate_a100_images_per_s")
GOALS = {"finetune_overhead": "<= 1.05", "pretrain_overhead": "<= 1.05", "mae_speedup": ">= 2.5",
         "embedding_cache_speedup": ">= 10", "loader_headroom": ">= 3", "vit_b_1024_lora_peak_gib": "<= 4",
         "metrics_share": "<= 0.1", "predict_slices_per_s": "report", "gpu_estimate_a100_images_per_s": "report"}


def benchmarks(quick: bool) -> list[tuple[tuple[str, ...], Callable[[], dict[str, Any]]]]:
    """(keys produced, function returning {key: entry}) in running order."""
    import bench_cache
    import bench_evaluate
    import bench_flops
    import bench_loader
    import bench_mae
    import bench_memory
    import bench_overhead

    return [
        (("finetune_overhead",), lambda: {"finetune_overhead": bench_overhead.measure("finetune", quick)}),
        (("pretrain_overhead",), lambda: {"pretrain_overhead": bench_overhead.measure("pretrain", quick)}),
        (("mae_speedup",), lambda: {"mae_speedup": bench_mae.measure(quick)}),
        (("embedding_cache_speedup",), lambda: {"embedding_cache_speedup": bench_cache.measure(quick)}),
        (("loader_headroom",), lambda: {"loader_headroom": bench_loader.measure(quick)}),
        (("vit_b_1024_lora_peak_gib",), lambda: {"vit_b_1024_lora_peak_gib": bench_memory.measure(quick)}),
        (("metrics_share", "predict_slices_per_s"), lambda: bench_evaluate.measure(quick)),
        (("gpu_estimate_a100_images_per_s",), lambda: {"gpu_estimate_a100_images_per_s": bench_flops.measure()}),
    ]


def run(quick: bool, only: list[str] | None) -> tuple[dict[str, Any], bool]:
    """All (or ``only``) benchmarks → ({key: entry}, whether every one ran)."""
    set_threads()
    results: dict[str, Any] = {}
    ok, started = True, time.perf_counter()
    for keys, function in benchmarks(quick):
        if only and not set(keys) & set(only):
            continue
        tick = time.perf_counter()
        try:
            with quiet_stdout():
                produced = function()
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            ok = False
            print(traceback.format_exc(), file=sys.stderr)
            produced = {key: entry(None, GOALS[key], {"error": f"{type(exc).__name__}: {exc}"}) for key in keys}
        for key in keys:
            produced[key]["detail"]["bench_seconds"] = round(time.perf_counter() - tick, 1)
        results.update(produced)
        print(f"[bench] {', '.join(keys)}: {time.perf_counter() - tick:.0f} s", file=sys.stderr)
    results["machine"] = entry(None, "report", {**machine(), "quick": quick,
                                                "total_seconds": round(time.perf_counter() - started, 1)})
    return results, ok


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return "–" if value is None else str(value)


def summary_line(key: str, detail: dict[str, Any]) -> str:
    """The few detail numbers that explain a row."""
    picks = {
        "finetune_overhead": ("stage_step_ms", "bare_step_ms", "batch_loading_ms", "clip_grad_norm_ms"),
        "pretrain_overhead": ("stage_step_ms", "bare_step_ms", "batch_loading_ms", "clip_grad_norm_ms"),
        "embedding_cache_speedup": ("arch", "epoch_s_without_cache", "epoch_s_with_cache", "cache_build_s"),
        "loader_headroom": ("slices_per_s_2_workers", "slices_per_s_0_workers", "vit_tiny_train_images_per_s"),
        "metrics_share": ("value_from",),
        "predict_slices_per_s": ("vit_tiny_256", "vit_b_256"),
    }
    if "error" in detail:
        return f"error: {detail['error']}"
    if key == "mae_speedup":
        return "; ".join(f"{name}: none {d['step_s']['none']} s, drop {d['step_s']['drop']} s, "
                         f"mask_token {d['step_s']['mask_token']} s" for name, d in detail.items()
                         if isinstance(d, dict) and "step_s" in d)
    if key == "vit_b_1024_lora_peak_gib":
        if "skipped" in detail:
            return "skipped in --quick"
        return (f"checkpointing on {detail['grad_checkpointing_on']['peak_rss_gib']} GiB, "
                f"off {detail['grad_checkpointing_off']['peak_rss_gib']} GiB")
    if key == "gpu_estimate_a100_images_per_s":
        return (f"{detail['flops']['step_gflop']} GFLOP/step, H100 {detail['images_per_s']['H100 SXM']} img/s "
                f"at MFU {detail['mfu']}")
    return ", ".join(f"{name} {_show(detail.get(name))}" for name in picks.get(key, ()) if name in detail)


def markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: machine, the table, the GPU estimate, then bench/analysis.md."""
    info = results["machine"]["detail"]
    lines = [
        "# Benchmark results", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, Python {info['python']}, "
        f"torch {info['torch']}, CUDA {'yes' if info['cuda'] else 'no'}. Run: `python bench/run.py"
        f"{' --quick' if info['quick'] else ''}` ({info['total_seconds']:.0f} s). Ratios are measured side by "
        "side in one process; absolute times on this shared machine are context only."
        + (f" Re-run afterwards with `--only ... --merge` ({info['rerun_seconds']:.0f} s): "
           + ", ".join(f"`{k}`" for k in info["rerun_keys"]) + "." if info.get("rerun_keys") else ""), "",
        "| key | value | goal | met | detail |", "|---|---|---|---|---|",
    ]
    for key in KEYS:
        if key in results:
            row = results[key]
            met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
            lines.append(f"| `{key}` | {_show(row['value'])} | {row['goal']} | {met} | "
                         f"{summary_line(key, row['detail'])} |")
    gpu = results.get("gpu_estimate_a100_images_per_s", {}).get("detail", {})
    if "flops" in gpu:
        flops, recompute = gpu["flops"], gpu["flops_grad_checkpointing"]
        lines += [
            "", "## GPU throughput on paper: ViT-B 1024 px, LoRA encoder + full decoder", "",
            f"FLOPs of one training image counted with `torch.utils.flop_counter.FlopCounterMode` "
            f"(`bench/bench_flops.py`, meta device): forward {flops['forward_gflop']} GFLOP, backward "
            f"{flops['backward_gflop']} GFLOP, step {flops['step_gflop']} GFLOP (with grad checkpointing "
            f"{recompute['step_gflop']} GFLOP: the encoder forward runs twice). LoRA leaves the frozen weights "
            "without weight gradients, so backward ≈ 1.2x forward rather than the 2x of full fine-tuning.", "",
            "| GPU | dense bf16 peak | images/s at MFU " + f"{gpu['mfu']:.0%}" + " | with grad checkpointing |",
            "|---|---|---|---|",
        ]
        for name, peak in gpu["peak_bf16_tflops"].items():
            lines.append(f"| {name} | {peak:g} TFLOP/s | {gpu['images_per_s'][name]} | "
                         f"{gpu['images_per_s_grad_checkpointing'][name]} |")
        lines += ["", "A run well below these (e.g. < 20 img/s on an A100 with bf16) is input- or "
                  "overhead-bound: check `images_per_s` in metrics.csv against them."]
    analysis = BENCH_DIR / "analysis.md"
    if analysis.is_file():
        lines += ["", analysis.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs, few steps (≤ 3 minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output file (default bench/results.json; with --quick bench/quick/results.json, "
                             "so a smoke run never replaces the committed full results)")
    parser.add_argument("--only", nargs="+", choices=KEYS, help="run only these benchmarks")
    parser.add_argument("--merge", action="store_true", help="with --only: update these keys in an existing --out")
    parser.add_argument("--markdown-only", action="store_true", help="only rewrite RESULTS.md from an existing --out")
    args = parser.parse_args()
    args.out = args.out or BENCH_DIR / ("quick" if args.quick else "") / "results.json"
    if args.markdown_only:
        from samadapt.io import write_text

        write_text(args.out.with_name("RESULTS.md"), markdown(json.loads(args.out.read_text(encoding="utf-8"))))
        return
    results, ok = run(args.quick, args.only)
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text(encoding="utf-8"))
        machine_entry = previous["machine"]
        machine_entry["detail"]["rerun_keys"] = [key for key in results if key != "machine"]
        machine_entry["detail"]["rerun_seconds"] = results["machine"]["detail"]["total_seconds"]
        results = {**previous, **results, "machine": machine_entry}
    text = json.dumps(results, indent=2)
    print(text)
    from samadapt.io import write_text

    write_text(args.out, text + "\n")
    write_text(args.out.with_name("RESULTS.md"), markdown(results))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
