"""``samadapt pretrain`` through the real CLI on real MRI (tiny model, few steps): it learns, exports weights
that load as SAM, resumes a killed run exactly, and runs as two processes through ``accelerate launch``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, kill_when, launch_two_processes, losses, run_cli


def pretrain_args(manifests, checkpoint, out: Path, **extra) -> list[str]:
    keys = {"arch": "vit_tiny", "image_size": 256, "checkpoint": checkpoint, "data": manifests["ssl"], "out": out,
            "steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "save_every": 4, "log_every": 1,
            "preview_every": 6, "variant": "mask_token", **extra}
    return ["pretrain", *(f"{k}={v}" for k, v in keys.items())]


def sam_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained(small_manifests, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    run_cli(*pretrain_args(small_manifests, tiny_checkpoint, out))
    return out


def test_pretrain_learns_and_exports_a_sam_checkpoint(pretrained, tiny_checkpoint):
    record = json.loads((pretrained / "stage_output.json").read_text(encoding="utf-8"))
    assert record["stage"] == "pretrain" and record["metrics"]["steps"] == 12
    loss = losses(pretrained)
    assert sorted(loss) == list(range(1, 13))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (10, 11, 12)) / 3
    assert last < 0.9 * first, loss
    assert sorted(p.name for p in (pretrained / "previews").iterdir()) == ["step_000006.png", "step_000012.png"]

    before, after = sam_state(tiny_checkpoint), sam_state(pretrained / "sam_checkpoint.pth")
    assert set(before) == set(after) and all(before[k].shape == after[k].shape for k in before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("image_encoder.blocks.") for k in changed)
    # MAE trains only the encoder: SAM's prompt encoder and mask decoder leave exactly as they came in.
    assert not any(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in changed)

    from samadapt.models.checkpoints import load_safetensors

    # The encoder alone at the trained size (vit_tiny trains at its native 256, so shapes equal the .pth's).
    encoder, metadata = load_safetensors(pretrained / "encoder.safetensors")
    assert metadata["image_size"] == "256" and metadata["arch"] == "vit_tiny"
    assert all(torch.equal(tensor, after["image_encoder." + name]) for name, tensor in encoder.items())
    assert len(encoder) == sum(k.startswith("image_encoder.") for k in after)


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_pretrain_resumes_and_matches_an_uninterrupted_run(pretrained, small_manifests, tiny_checkpoint,
                                                                   tmp_path, seed):
    out = tmp_path / "killed"
    args = pretrain_args(small_manifests, tiny_checkpoint, out)
    kill_when(args, out / "state" / "step_4" / "progress.json", delay=random.Random(seed).uniform(0.0, 0.4))
    assert not (out / "stage_output.json").exists()  # a killed run never looks finished

    result = run_cli(*args)
    record = json.loads((out / "stage_output.json").read_text(encoding="utf-8"))
    resumed = record["metrics"]["resumed_from_step"]
    assert resumed in (4, 8), result.stdout
    # Same batches, masks and RNG after the resume: the losses and the exported weights equal the
    # uninterrupted run's.
    reference, again = losses(pretrained), losses(out)
    assert sorted(again) == list(range(1, 13))
    for step in range(resumed + 1, 13):
        assert again[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), (step, again, reference)
    exported, expected = sam_state(out / "sam_checkpoint.pth"), sam_state(pretrained / "sam_checkpoint.pth")
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], rtol=1e-4, atol=1e-5)


def test_pretrain_runs_as_two_processes(small_manifests, tiny_checkpoint, tmp_path):
    out = tmp_path / "ddp"
    args = pretrain_args(small_manifests, tiny_checkpoint, out, steps=4, save_every=2, batch_size=2)
    launch_two_processes(*args)
    record = json.loads((out / "stage_output.json").read_text(encoding="utf-8"))
    assert record["metrics"]["steps"] == 4 and record["metrics"]["processes"] == 2
    # One process writes the run folder: a single metrics row per step, a single state per save.
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step_2"]
    # The same 4 images per step on one process (the 2 processes take alternate batches of 2 from the same
    # seeded order); only the random masks differ, so the losses agree within a tolerance.
    single = tmp_path / "single"
    run_cli(*pretrain_args(small_manifests, tiny_checkpoint, single, steps=4, save_every=2, batch_size=4))
    two, one = losses(out), losses(single)
    assert all(abs(two[s] - one[s]) < 0.15 * one[s] for s in one), (two, one)


def test_pretrain_refuses_a_checkpoint_of_another_arch(small_manifests, tiny_checkpoint, tmp_path):
    result = run_cli(*pretrain_args(small_manifests, tiny_checkpoint, tmp_path / "x", arch="vit_b"), expect=None)
    assert_one_line_error(result, str(tiny_checkpoint), "vit_tiny")
    assert not (tmp_path / "x" / "stage_output.json").exists()


def test_pretrain_refuses_a_labeled_manifest_without_images(tmp_path, small_manifests, tiny_checkpoint):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(
        json.dumps({"id": "a", "image": "missing.nii.gz", "modality": "MR", "split": "train"}) + "\n", encoding="utf-8"
    )
    result = run_cli(*pretrain_args({"ssl": manifest}, tiny_checkpoint, tmp_path / "y"), expect=None)
    assert_one_line_error(result, "missing.nii.gz")


@pytest.mark.parametrize(
    "overrides, fragment",
    [({"mask_ratio": 1.5}, "mask_ratio"), ({"skip_empty": 0.999}, "no usable slices"),
     ({"target": "features", "checkpoint": "none"}, "checkpoint=none")],
)
def test_pretrain_bad_settings_are_one_line_errors(small_manifests, tiny_checkpoint, tmp_path, overrides, fragment):
    keys = {"checkpoint": tiny_checkpoint, **overrides}
    result = run_cli(*pretrain_args(small_manifests, keys.pop("checkpoint"), tmp_path / "z", **keys), expect=None)
    assert_one_line_error(result, fragment)


def test_vit_b_pretrain_export_loads_in_stock_segment_anything(small_manifests, tmp_path):
    """A vit_b-shaped random SAM, trained 2 steps at 64 px with patch dropping and the pixel + feature target:
    the export has the official 1024-px shapes, stock ``sam_model_registry["vit_b"]`` loads it, and only the
    image encoder changed (vit_b, not vit_tiny: stock segment_anything has no window-8 config to load it)."""
    from segment_anything import sam_model_registry

    from samadapt.models.checkpoints import save_sam_checkpoint
    from samadapt.models.registry import build_sam

    torch.manual_seed(3)
    base = save_sam_checkpoint(build_sam("vit_b"), "vit_b", tmp_path / "sam_vit_b_random.pth")
    out = tmp_path / "vit_b"
    run_cli(
        *pretrain_args(
            small_manifests,
            base,
            out,
            arch="vit_b",
            image_size=64,
            steps=2,
            batch_size=2,
            save_every=100,
            preview_every=0,
            decoder_dim=64,
            decoder_depth=1,
            variant="patch_drop",
            target="both",
        )
    )
    rows = (out / "metrics.csv").read_text(encoding="utf-8").splitlines()
    header, last = rows[0].split(","), dict(zip(rows[0].split(","), rows[-1].split(","), strict=True))
    assert {"pixels_loss", "features_loss"} <= set(header)
    assert float(last["loss"]) == pytest.approx(float(last["pixels_loss"]) + float(last["features_loss"]), rel=1e-4)
    stock = sam_model_registry["vit_b"](checkpoint=str(out / "sam_checkpoint.pth"))
    exported = stock.state_dict()
    before = sam_state(base)
    assert exported["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert not torch.equal(
        exported["image_encoder.blocks.0.attn.qkv.weight"], before["image_encoder.blocks.0.attn.qkv.weight"]
    )
    assert all(
        torch.equal(exported[k], before[k]) for k in before if k.startswith(("prompt_encoder.", "mask_decoder."))
    )
    # The same SAM at the trained 64 px: loads at 64 px with the trained encoder exactly (no resampling).
    from samadapt.models.checkpoints import load_safetensors, load_sam

    trained, _ = load_safetensors(out / "encoder.safetensors")
    native = load_sam("vit_b", out / "sam_checkpoint.safetensors", image_size=64).image_encoder.state_dict()
    assert native["pos_embed"].shape == (1, 4, 4, 768)
    assert all(torch.equal(native[name], tensor) for name, tensor in trained.items())


def test_layer_wise_lr_decay_scales_each_encoder_block():
    from samadapt.models.registry import build_sam
    from samadapt.pretrain.mae import MaskedAutoencoderSAM
    from samadapt.training import layer_lr_scale, param_groups

    mae = MaskedAutoencoderSAM(build_sam("vit_tiny").image_encoder)
    groups = param_groups(mae, 0.05, layer_lr_scale(mae, 0.5))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(mae.named_parameters())
    assert scale[id(named["encoder.blocks.3.attn.qkv.weight"])] == 0.5  # the last of 4 blocks
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5**4
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == 0.5**5
    assert scale[id(named["heads.pixels.weight"])] == 1.0  # the MAE decoder learns at the full rate
    assert decay[id(named["encoder.blocks.0.norm1.weight"])] == 0.0 and decay[id(named["encoder.pos_embed"])] == 0.0
    assert decay[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.05
