"""Training LiteMedSAM's TinyViT encoder (``vit_t_lite``) through the finetune stage's own model and loss:
``grad_checkpointing`` gives the same gradients, the encoder strategies (adapter, LoRA, full) train what they
should and nothing else, and the packaged pipeline of the study's vit_t row from LiteMedSAM plans its runs.

The models are random and small: ``vit_t_lite`` is built at 64 px (its own classes and layout, 16 x 16
embeddings) instead of its native 256 px, where one forward+backward takes ~30 s on one CPU thread.
"""

from __future__ import annotations

import pytest
import test_litemedsam
import torch

from conftest import run_cli

torch.set_num_threads(1)  # see test_strategies: shared cores
# Fixtures shared with test_litemedsam: the demo head's slices as a manifest, the packaged weights.
tiny_head, pretrained_state = test_litemedsam.tiny_head, test_litemedsam.pretrained_state
SIZE = 64  # px; the stride-1 stem keeps the conv stage at S x S, so cost grows fast with S
TINYVIT_BLOCKS = 2 + 2 + 6 + 2  # MBConv / TinyViTBlock per stage of TinyViT-5M


@pytest.fixture
def small_lite(monkeypatch):
    """Lets ``vit_t_lite`` be configured at ``SIZE`` px: configs pin it to its native 256, the classes do not."""
    from samadapt.keys import FIXED_IMAGE_SIZE

    monkeypatch.delitem(FIXED_IMAGE_SIZE, "vit_t_lite")


def finetune_config(tmp_path, encoder: str, grad_checkpointing: bool, decoder: str = "frozen"):
    from samadapt.config import parse_config
    from samadapt.finetune.config import FinetuneConfig

    keys = [f"out={tmp_path}", "data=unused.jsonl", "arch=vit_t_lite", f"image_size={SIZE}", "num_classes=2",
            "prompt=box", f"encoder={encoder}", f"decoder={decoder}", f"grad_checkpointing={grad_checkpointing}",
            "lora.targets=qkv,proj,mlp", "seed=0"]
    return parse_config(FinetuneConfig, None, keys)


def batch(seed: int, size: int = 1) -> dict:
    """A training batch as the slice loader gives it: slices in [0, 1] with a bright square, its label."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(size, 1, SIZE, SIZE, generator=generator) * 0.3
    label = torch.zeros(size, SIZE, SIZE, dtype=torch.long)
    for i in range(size):
        corner = int(torch.randint(4, SIZE // 2, (1,), generator=generator))
        image[i, 0, corner : corner + 24, corner : corner + 24] += 0.6
        label[i, corner : corner + 24, corner : corner + 24] = 1
    return {"image": image, "label": label, "case_id": [f"case{seed}"] * size, "slice": torch.arange(size),
            "augment_seed": torch.arange(size) + 100 * seed}


def step(model, loss_fn, seed: int) -> None:
    """One forward+backward of the finetune loss on ``batch(seed)`` in training mode."""
    model.train()
    loss, _ = loss_fn(model, batch(seed))
    loss.backward()


def test_grad_checkpointing_gives_the_same_lora_gradients(small_lite, tmp_path, monkeypatch):
    """encoder=lora (peft, frozen stem): recomputing TinyViT's blocks in backward changes no gradient, and
    every block really is recomputed (a reentrant checkpoint would leave the LoRA weights without gradient)."""
    import samadapt.models.forward as forward
    from samadapt.finetune.stage import build_model, make_loss_fn

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(forward, "checkpoint", counted)
    grads = {}
    for checkpointing in (False, True):
        config = finetune_config(tmp_path, "lora", checkpointing)
        model = build_model(config)
        with torch.no_grad():  # LoRA's B starts at zero, which would leave A without gradient: randomise both
            generator = torch.Generator().manual_seed(1)
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        step(model, make_loss_fn(config, model, use_embeddings=False), seed=0)
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(calls) == TINYVIT_BLOCKS and all(k["use_reentrant"] is False for k in calls)
    assert grads[False].keys() == grads[True].keys()
    encoder_lora = [n for n in grads[True] if "image_encoder" in n and ".lora_" in n]
    assert encoder_lora and all(grads[True][n] is not None and grads[True][n].abs().sum() > 0 for n in encoder_lora)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, msg=name)


@pytest.mark.parametrize("encoder", ["adapter", "lora", "full"])
def test_encoder_strategies_train_only_their_weights(small_lite, tmp_path, encoder):
    """Two AdamW steps through the stage's model and loss (grad_checkpointing on, as configs now allow):
    every frozen parameter is bit-identical, the strategy's own parameters moved."""
    from samadapt.finetune.stage import build_model, make_loss_fn

    config = finetune_config(tmp_path, encoder, grad_checkpointing=True)
    model = build_model(config)
    loss_fn = make_loss_fn(config, model, use_embeddings=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for seed in range(2):
        optimizer.zero_grad()
        step(model, loss_fn, seed)
        optimizer.step()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert not moved - trainable, f"frozen weights changed: {sorted(moved - trainable)[:5]}"
    if encoder == "adapter":
        expected = {n for n in trainable if n.startswith("bottleneck_adapters.image_encoder.")}
        assert trainable == expected  # decoder=frozen: nothing else trains
        ups = {n for n in expected if ".up." in n}  # zero-initialised, so they move first
        assert ups and ups <= moved
    elif encoder == "lora":
        assert trainable and all(".lora_" in n and "image_encoder" in n for n in trainable)
        assert moved == trainable  # B moves at step 1, A at step 2 (once B is non-zero)
    else:
        assert trainable == {n for n in before if n.startswith("sam.image_encoder.")}
        assert len(moved) >= 0.95 * len(trainable), f"{len(trainable - moved)} encoder weights did not move"


def test_strategy_grid_litemedsam_plans_six_finetunes(tmp_path):
    result = run_cli("run", "strategy_grid_litemedsam", "--dry-run", "--cost", "--runs-dir", tmp_path)
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()]
    strategies = ["dec-full", "dec-lora", "dec-adapter", "encdec-full", "encdec-lora", "encdec-adapter"]
    cells = [f"vit_t_lite-{s}" for s in strategies]
    assert [w[0] for w in lines if w[0].startswith("finetune/")] == [f"finetune/{c}" for c in cells]
    assert [w[0] for w in lines if w[0].startswith("evaluate/")] == [f"evaluate/{c}" for c in cells]
    assert all(w[2] == "run" for w in lines if w[0].startswith(("finetune/", "evaluate/")))
    estimates = {w[0]: float(w[w.index("cost:") + 1]) for w in lines if w[0].startswith("finetune/")}
    assert all(value > 0 for value in estimates.values())  # TFLOP per step, on paper
    assert estimates["finetune/vit_t_lite-encdec-full"] > estimates["finetune/vit_t_lite-dec-full"]


def test_cost_estimate_of_a_finetune_counts_the_encoder_it_trains():
    """FLOPs per step on the meta device: positive, encoder=full costs more than decoding cached embeddings."""
    from samadapt.config import parse_config
    from samadapt.cost import finetune_cost_line, finetune_flops
    from samadapt.finetune.config import FinetuneConfig

    def config(encoder: str):
        return parse_config(FinetuneConfig, None, ["data=x.jsonl", "out=unused", "num_classes=2", "arch=vit_tiny",
                                                   "prompt=box", f"encoder={encoder}", "decoder=full", "steps=100"])

    frozen, full = finetune_flops(config("frozen")), finetune_flops(config("full"))
    assert frozen.step > 0 and frozen.encoder_per_slice > 0  # a decoder step, plus the cache's encoder pass
    assert full.encoder_per_slice == 0 and full.step > frozen.step + full.batch * frozen.encoder_per_slice
    assert full.backward > full.forward  # full training: weight and input gradients
    line = finetune_cost_line(config("full"))
    assert line.startswith(f"cost: {full.step / 1e12:.3g} TFLOP/step x 100 steps") and "min on an A100" in line


def _litemedsam_finetune(tiny_head, out, *extra: str):
    """The real CLI (in-process) fine-tuning the packaged LiteMedSAM on the demo head's slices; its record."""
    from conftest import record_of

    run_cli("finetune", f"data={tiny_head['manifest']}", f"out={out}", f"cache_dir={out.parent / 'cache'}",
            "checkpoint=litemedsam", "num_classes=2", "steps=1", "batch_size=1", "lr=1e-2", "val_split=none",
            "tensorboard=false", "eval_batch_size=2", *extra)
    return record_of(out)


def test_cli_encoder_lora_with_grad_checkpointing_from_litemedsam(tiny_head, tmp_path):
    """encoder=lora + grad_checkpointing=true on the real 256-px LiteMedSAM (refused before): the run finishes and
    the encoder's LoRA moved (one step: B leaves zero)."""
    from safetensors.torch import load_file

    record = _litemedsam_finetune(tiny_head, tmp_path / "lora", "prompt=box", "encoder=lora", "decoder=frozen",
                                  "lora.blocks=last1", "grad_checkpointing=true")
    assert record["config"]["grad_checkpointing"] is True and record["config"]["arch"] == "vit_t_lite"
    lora = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in lora.items() if "image_encoder" in name and "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)


def test_cli_automatic_mode_from_litemedsam(tiny_head, tmp_path, pretrained_state):
    """prompt=none (automatic masks, new class head) from the pretrained decoder, on cached embeddings: the class
    head and the decoder trained, the encoder and the prompt encoder stayed bit-identical."""
    from samadapt.models.finetuned import load_finetune_output

    record = _litemedsam_finetune(tiny_head, tmp_path / "auto", "prompt=none", "encoder=frozen", "decoder=full",
                                  "steps=2")
    assert record["metrics"]["steps"] == 2 and record["metrics"]["input_norm"] == "minmax"
    model = load_finetune_output(tmp_path / "auto").model
    sam = model.sam.state_dict()
    for part, trained in (("image_encoder.", False), ("prompt_encoder.", False), ("mask_decoder.", True)):
        changed = any(not torch.equal(sam[k], v) for k, v in pretrained_state.items() if k.startswith(part))
        assert changed == trained, part
    assert model.class_head.tokens.shape == (1, 256)  # binary: one sigmoid output


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_finetuning_keeps_the_pretrained_batchnorm_statistics(small_lite, tmp_path, grad_checkpointing):
    """Only trained tensors are saved: TinyViT's BatchNorm statistics must not drift in training (eval mode), nor
    when the backward recomputes the blocks."""
    from samadapt.finetune.stage import build_model, make_loss_fn

    config = finetune_config(tmp_path, "full", grad_checkpointing)
    model = build_model(config)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("_mean", "_var"))}
    step(model, make_loss_fn(config, model, use_embeddings=False), seed=0)
    assert before and all(torch.equal(before[n], b) for n, b in model.named_buffers() if n in before)
    assert model.training and model.sam.image_encoder.training  # everything else trains as usual


def test_tinyvit_position_biases_get_no_weight_decay(small_lite, tmp_path):
    """encoder=full: TinyViT's per-head attention biases (2-D position tables) join the no-decay group, its conv
    and linear weights decay."""
    from samadapt.finetune.stage import build_model
    from samadapt.training import param_groups

    model = build_model(finetune_config(tmp_path, "full", False))
    decay_of = {id(p): g["weight_decay"] for g in param_groups(model, 0.05) for p in g["params"]}
    named = dict(model.named_parameters())
    biases = [n for n in named if n.endswith("attention_biases")]
    assert biases and all(named[n].ndim == 2 and decay_of[id(named[n])] == 0.0 for n in biases)
    assert all(decay_of[id(p)] == 0.05 for n, p in named.items() if n.endswith("qkv.weight"))
