"""Peak RSS of one ViT-B 1024 px fine-tune step, LoRA encoder + full decoder, batch 1 (JSON on stdout).

    python bench/bench_memory.py                     # both settings, each in a fresh subprocess
    python bench/bench_memory.py --one on|off        # one setting in this process

One step = the stage's model (``build_model``: vit_b, image_size 1024, encoder=lora decoder=full
prompt=none, random weights) → the stage's loss (``make_loss_fn``: forward, DiceCE) → backward → AdamW
step, with grad checkpointing on (the goal) and off. Peak = ``VmHWM`` of the fresh interpreter (imports and
weights included, the first step also allocates the AdamW state).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from common import current_rss_gib, entry, peak_rss_gib, print_json, run_json_subprocess, set_threads

SIZE = 1024


def one(checkpointing: bool) -> dict:
    from samadapt.finetune.config import FinetuneConfig
    from samadapt.finetune.stage import build_model, make_loss_fn

    set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        config = FinetuneConfig(data="demo:brain", out=Path(tmp), num_classes=2, arch="vit_b", image_size=SIZE,
                                encoder="lora", decoder="full", prompt="none", batch_size=1,
                                grad_checkpointing=checkpointing)
        model = build_model(config)
    model.train()
    loss_fn = make_loss_fn(config, model, use_embeddings=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {"image": torch.rand(1, 1, SIZE, SIZE), "label": (torch.rand(1, SIZE, SIZE) > 0.5).long(),
             "case_id": ["random"], "slice": torch.tensor([0]), "augment_seed": torch.tensor([0])}
    gc.collect()
    before = current_rss_gib()
    start = time.perf_counter()
    loss_fn(model, batch)[0].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"peak_rss_gib": round(peak_rss_gib(), 3), "rss_before_step_gib": round(before, 3),
            "step_s": round(time.perf_counter() - start, 1)}


def measure(quick: bool) -> dict:
    """Full run only (ViT-B at 1024 px takes about a minute per step here); null in --quick."""
    if quick:
        return entry(None, "<= 4", {"skipped": "--quick"})
    runs = {name: run_json_subprocess("bench_memory.py", "--one", name) for name in ("on", "off")}
    detail = {"arch": "vit_b 1024 encoder=lora decoder=full prompt=none", "batch": 1,
              "grad_checkpointing_on": runs["on"], "grad_checkpointing_off": runs["off"]}
    return entry(runs["on"]["peak_rss_gib"], "<= 4", detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=("on", "off"))
    args = parser.parse_args()
    if args.one:
        print_json(one(args.one == "on"))
    else:
        print_json({"vit_b_1024_lora_peak_gib": measure(False)})


if __name__ == "__main__":
    main()
