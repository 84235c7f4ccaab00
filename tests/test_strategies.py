"""Fine-tuning strategies on the tiny SAM (vit_tiny @ 256 px): what trains, LoRA targets, adapters, save/load/merge."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
import torch
from peft import PeftModel
from torch import nn

from conftest import assert_one_line_error, run_cli
from samadapt.errors import UserError
from samadapt.keys import STRATEGIES, AdapterKeys, LoraKeys, StrategyKeys
from samadapt.models import build_sam
from samadapt.models.finetuned import load_finetuned, merge_into_sam, save_finetuned
from samadapt.models.prompts import Prompts
from samadapt.models.segmenter import SamSegmenter
from samadapt.models.strategies import (
    apply_strategy,
    is_lora_param,
    parameter_summary,
    parameter_summary_line,
    plain_key,
)

torch.set_num_threads(1)  # measured: 2 threads were ~20x slower when other processes share the 2 cores
IMAGE_SIZE = 256


def base_model(num_classes: int = 3, prompt: str = "none", seed: int = 0, arch: str = "vit_tiny") -> SamSegmenter:
    """The same base weights for the same seed, like loading one checkpoint twice."""
    torch.manual_seed(seed)
    sam = build_sam(arch, IMAGE_SIZE)
    with torch.no_grad():  # zero-initialised in a fresh SAM: randomise so they take part in every check
        for name, param in sam.named_parameters():
            if "pos" in name:
                param.normal_(std=0.02)
    return SamSegmenter(sam, num_classes, prompt)


def images(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def run(model: SamSegmenter, x: torch.Tensor) -> torch.Tensor:
    """logits B x C x S x S; prompted models get one fixed box per image."""
    if model.prompt == "none":
        return model(x)
    box = torch.tensor([[[40.0, 60.0, 180.0, 200.0]]]).expand(len(x), 1, 4)
    return model(x, Prompts(present=torch.ones(len(x), 1, dtype=torch.bool), boxes=box))


def loss(model: SamSegmenter, seed: int) -> torch.Tensor:
    x = images(seed=seed)
    labels = torch.randint(
        0, model.num_classes, (len(x), IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(seed)
    )
    present = torch.ones(len(x), model.num_classes - 1, dtype=torch.bool)
    return model.loss_fn(run(model, x), labels, present)


def train_two_steps(model: SamSegmenter) -> None:
    """Two AdamW steps (no weight decay: a parameter moves only through its gradient) on random labels."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(2):
        optimizer.zero_grad()
        loss(model, seed=step).backward()
        optimizer.step()
    model.eval()


@functools.cache
def used_parameters() -> frozenset[str]:
    """SAM parameters the automatic mode's forward really uses (e.g. not SAM's own mask tokens or IoU head):
    a fully trainable model's parameters with a non-zero gradient."""
    model = base_model()
    loss(model, seed=0).backward()
    return frozenset(n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {plain_key(name): param.detach().clone() for name, param in model.named_parameters()}


def should_train(key: str, encoder: str, decoder: str) -> bool:
    """The intended trainable set, written from the strategy table (not from requires_grad)."""
    if key.startswith(("class_head.", "bottleneck_adapters.")) or is_lora_param(key):
        return True
    if key.replace(".base_layer.", ".") not in used_parameters():
        return False
    if key.startswith("sam.image_encoder."):
        return encoder == "full"
    if key.startswith("sam.mask_decoder."):
        return decoder == "full"
    assert key.startswith("sam.prompt_encoder."), key
    return False


@pytest.mark.parametrize("encoder,decoder", list(itertools.product(STRATEGIES, STRATEGIES)))
def test_only_intended_parameters_change(encoder: str, decoder: str) -> None:
    model = apply_strategy(base_model(), encoder, decoder, LoraKeys(), AdapterKeys(bottleneck=8))
    before = snapshot(model)
    train_two_steps(model)
    after = snapshot(model)

    moved = {k for k in before if not torch.equal(before[k], after[k])}
    intended = {k for k in before if should_train(k, encoder, decoder)}
    assert moved == intended, f"unexpected: {sorted(moved - intended)[:5]}, frozen: {sorted(intended - moved)[:5]}"
    for part, strategy in (("sam.image_encoder.", encoder), ("sam.mask_decoder.", decoder)):
        assert any(is_lora_param(k) and k.startswith(part) for k in before) == (strategy == "lora")
    for part, strategy in (("image_encoder.", encoder), ("mask_decoder.", decoder)):
        assert any(k.startswith("bottleneck_adapters." + part) for k in before) == (strategy == "adapter")
    assert not any(k.startswith("sam.prompt_encoder.") for k in moved)
    # so that every encoder weight is checked: the forward uses all of them
    assert all(
        k.replace(".base_layer.", ".") in used_parameters()
        for k in before
        if k.startswith("sam.image_encoder.") and not is_lora_param(k)
    )


def lora_layers(model: nn.Module) -> set[str]:
    return {plain_key("sam." + name) for name, module in model.sam.named_modules() if hasattr(module, "lora_A")}


def test_lora_targets_are_anchored_and_follow_blocks() -> None:
    model = apply_strategy(base_model(), "lora", "frozen", LoraKeys(targets="qkv,proj"), AdapterKeys())
    assert type(model.sam.get_base_model().image_encoder.patch_embed.proj) is nn.Conv2d
    assert not re.fullmatch(model.sam.peft_config["default"].target_modules, "image_encoder.patch_embed.proj")
    assert lora_layers(model) == {f"sam.image_encoder.blocks.{i}.attn.{n}" for i in range(4) for n in ("qkv", "proj")}

    model = apply_strategy(base_model(), "lora", "lora", LoraKeys(targets="mlp", blocks="last2"), AdapterKeys())
    encoder_layers = {n for n in lora_layers(model) if n.startswith("sam.image_encoder")}
    assert encoder_layers == {f"sam.image_encoder.blocks.{i}.mlp.{n}" for i in (2, 3) for n in ("lin1", "lin2")}
    decoder_layers = {n for n in lora_layers(model) if n.startswith("sam.mask_decoder")}
    assert decoder_layers == {
        f"sam.mask_decoder.transformer.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("lin1", "lin2")
    }


@pytest.mark.parametrize(
    "encoder,decoder,lora,needle",
    [
        ("lora", "frozen", LoraKeys(targets=r"qkv,attn\.qkvz"), "attn.qkv, attn.proj, mlp.lin1, mlp.lin2"),
        ("frozen", "lora", LoraKeys(targets=r"mlp\.fc1"), "transformer.layers.*.self_attn.q_proj"),
        ("lora", "frozen", LoraKeys(blocks="0,7"), "4 blocks"),
        ("lora", "frozen", LoraKeys(blocks="last5"), "4 blocks"),
        ("partial", "full", LoraKeys(), "frozen, full, lora, adapter"),
    ],
)
def test_bad_lora_settings_are_user_errors(encoder: str, decoder: str, lora: LoraKeys, needle: str) -> None:
    with pytest.raises(UserError, match=re.escape(needle)):
        apply_strategy(base_model(), encoder, decoder, lora, AdapterKeys())


def test_bad_key_values_fail_at_config_time() -> None:
    from samadapt.config import build

    for values in (
        {"rank": 0},
        {"dropout": 1.0},
        {"dropout": float("nan")},
        {"blocks": "first2"},
        {"targets": "qkv,("},
    ):
        with pytest.raises(UserError):
            build(LoraKeys, values)


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_t"])
def test_adapters_start_as_identity(arch: str) -> None:
    plain = base_model(arch=arch).eval()
    x = images(batch=1)
    with torch.no_grad():
        reference = plain(x)
        adapted = apply_strategy(plain, "adapter", "adapter", LoraKeys(), AdapterKeys(bottleneck=8))(x)
    assert len(plain.bottleneck_adapters.image_encoder) == (4 if arch == "vit_tiny" else 10)
    assert len(plain.bottleneck_adapters.mask_decoder) == 2
    assert list(plain.sam.state_dict()) == list(build_sam(arch, IMAGE_SIZE).state_dict())  # sam. keys stay official
    assert torch.equal(reference, adapted)


def test_lora_on_tinyvit_uses_its_layer_names() -> None:
    model = base_model(arch="vit_t")
    apply_strategy(model, "lora", "frozen", LoraKeys(targets="qkv,mlp", blocks="last3"), AdapterKeys())
    expected = {
        f"sam.image_encoder.{b}.{n}"
        for b in ("layers.2.blocks.5", "layers.3.blocks.0", "layers.3.blocks.1")
        for n in ("attn.qkv", "mlp.fc1", "mlp.fc2")
    }
    assert lora_layers(model) == expected


def test_parameter_summary_counts_and_line() -> None:
    model = apply_strategy(base_model(), "lora", "full", LoraKeys(), AdapterKeys())
    summary = parameter_summary(model)
    params = list(model.parameters())
    assert summary["total"] == sum(p.numel() for p in params)
    assert summary["trainable"] == sum(p.numel() for p in params if p.requires_grad)
    assert summary["by_part"]["sam.prompt_encoder"]["trainable"] == 0
    head = sum(p.numel() for p in model.class_head.parameters())
    assert summary["by_part"]["class_head"] == {"trainable": head, "total": head}
    assert summary["by_part"]["sam.mask_decoder"]["trainable"] == summary["by_part"]["sam.mask_decoder"]["total"]
    assert re.fullmatch(r"trainable \d+\.\dM / \d+\.\dM \(\d+\.\d%\)", parameter_summary_line(summary))
    assert parameter_summary_line({"trainable": 1_234, "total": 93_700_000}) == "trainable 1.2k / 93.7M (0.0013%)"


@pytest.mark.parametrize("encoder,decoder", [("lora", "full"), ("adapter", "lora"), ("full", "adapter")])
def test_save_then_load_gives_identical_outputs(tmp_path, encoder: str, decoder: str) -> None:
    strategy = StrategyKeys(encoder=encoder, decoder=decoder, lora=LoraKeys(rank=4), adapter=AdapterKeys(bottleneck=8))
    model = apply_strategy(base_model(), encoder, decoder, strategy.lora, strategy.adapter)
    train_two_steps(model)
    save_finetuned(model, tmp_path)
    written = save_finetuned(model, tmp_path)  # a second save replaces the first
    uses_lora = "lora" in (encoder, decoder)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() == uses_lora
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() == uses_lora
    assert sorted(p.name for p in tmp_path.iterdir()) == (["adapter"] if uses_lora else []) + ["trainable.safetensors"]
    from safetensors.torch import load_file

    keys = load_file(str(written["trainable"])).keys()
    assert not any(is_lora_param(k) or "base_layer" in k or "base_model" in k for k in keys)
    assert any(k.startswith("class_head.") for k in keys)

    x = images(seed=5, batch=1)
    with torch.no_grad():
        trained = model(x)
        fresh = base_model()
        assert not torch.equal(fresh(x), trained)  # loading has something to restore
        loaded = load_finetuned(fresh, tmp_path, strategy).eval()(x)
    assert torch.equal(trained, loaded)

    if uses_lora:  # the contract: out/adapter loads with peft onto a plain base SAM
        peft_sam = PeftModel.from_pretrained(base_model().sam, tmp_path / "adapter")
        ours = {k: v for k, v in model.sam.state_dict().items() if "lora_" in k}
        theirs = peft_sam.state_dict()
        assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())


def test_load_with_another_strategy_is_a_user_error(tmp_path) -> None:
    model = apply_strategy(base_model(), "frozen", "full", LoraKeys(), AdapterKeys())
    save_finetuned(model, tmp_path)
    with pytest.raises(UserError, match="trainable.safetensors"):
        load_finetuned(base_model(), tmp_path, StrategyKeys(encoder="full", decoder="full"))
    with pytest.raises(UserError, match="adapter"):
        load_finetuned(base_model(), tmp_path, StrategyKeys(encoder="lora", decoder="full"))


@pytest.mark.parametrize("encoder,decoder", [("lora", "full"), ("lora", "lora"), ("full", "frozen")])
def test_merged_sam_matches_and_loads_in_stock_sam(encoder: str, decoder: str) -> None:
    model = apply_strategy(base_model(num_classes=2, prompt="box"), encoder, decoder, LoraKeys(rank=4), AdapterKeys())
    train_two_steps(model)
    merged = merge_into_sam(model)
    stock = build_sam("vit_tiny", IMAGE_SIZE)
    assert list(merged.state_dict()) == list(stock.state_dict())
    stock.load_state_dict(merged.state_dict(), strict=True)
    x = images(seed=7, batch=1)
    with torch.no_grad():
        wrapped, plain = run(model, x), run(SamSegmenter(stock, 2, "box").eval(), x)
    torch.testing.assert_close(plain, wrapped, rtol=1e-4, atol=1e-5)
    assert isinstance(model.sam, PeftModel) == (encoder == "lora")  # the trained model is left as it was


def test_merge_refuses_modules_plain_sam_cannot_hold() -> None:
    with pytest.raises(UserError, match="class_head"):
        merge_into_sam(apply_strategy(base_model(prompt="none"), "lora", "full", LoraKeys(), AdapterKeys()))
    with pytest.raises(UserError, match="bottleneck_adapters"):
        merge_into_sam(apply_strategy(base_model(prompt="box"), "adapter", "full", LoraKeys(), AdapterKeys()))


@pytest.mark.parametrize(
    "arch,depth",
    [
        ("vit_b", 12),
        pytest.param("vit_l", 24, marks=pytest.mark.slow),
        pytest.param("vit_h", 32, marks=pytest.mark.slow),
    ],
)
def test_large_archs_get_lora_and_adapters_per_block(arch: str, depth: int) -> None:
    lora_model = apply_strategy(
        SamSegmenter(build_sam(arch, IMAGE_SIZE), 2, "box"), "lora", "frozen", LoraKeys(blocks="last4"), AdapterKeys()
    )
    assert lora_layers(lora_model) == {
        f"sam.image_encoder.blocks.{i}.attn.{n}" for i in range(depth - 4, depth) for n in ("qkv", "proj")
    }
    adapted = apply_strategy(
        SamSegmenter(build_sam(arch, IMAGE_SIZE), 2, "box"), "adapter", "frozen", LoraKeys(), AdapterKeys()
    )
    assert len(adapted.bottleneck_adapters.image_encoder) == depth


@pytest.mark.parametrize("encoder", ["lora", "adapter", "full"])
def test_layer_decay_scales_the_encoder_blocks_a_strategy_trains(encoder: str) -> None:
    """Finetune's layer_decay: what trains in block i of 4 gets 0.5^(4-i) whatever wraps it (peft's
    ``base_model.model.`` prefix, adapters numbered by block); the decoder learns at the full rate. LoRA on the
    last two blocks only still counts all four (frozen blocks fix the depth)."""
    from samadapt.training import layer_lr_scale, param_groups

    model = apply_strategy(base_model(), encoder, "full", LoraKeys(blocks="last2"), AdapterKeys(bottleneck=8))
    groups = param_groups(model, 0.05, layer_lr_scale(model, 0.5))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    scales = {name: scale_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}
    encoder_scales = {name: s for name, s in scales.items() if "image_encoder" in name}
    block = re.compile(r"\.(\d+)\.")
    in_blocks = {name: s for name, s in encoder_scales.items() if "blocks" in name or "adapters" in name}
    assert in_blocks and all(s == 0.5 ** (4 - int(block.search(name).group(1))) for name, s in in_blocks.items())
    assert (0.5 ** 4 in in_blocks.values()) == (encoder != "lora")  # LoRA sits on blocks 2 and 3 only
    if encoder == "full":
        assert scales["sam.image_encoder.patch_embed.proj.weight"] == 0.5 ** 5
        assert scales["sam.image_encoder.pos_embed"] == 0.5 ** 5
        assert scales["sam.image_encoder.neck.0.weight"] == 1.0
    decoder = [s for name, s in scales.items() if "mask_decoder" in name]
    assert decoder and set(decoder) == {1.0}
    assert layer_lr_scale(model, 1.0) is None


def test_layer_decay_is_refused_where_it_scales_nothing(tmp_path) -> None:
    keys = ["data=x.jsonl", f"out={tmp_path}", "num_classes=2"]
    for extra, fragment in ((["arch=vit_t"], "is a TinyViT"), (["encoder=frozen"], "encoder=frozen trains none")):
        assert_one_line_error(run_cli("finetune", *keys, "layer_decay=0.75", *extra, expect=None), fragment)
