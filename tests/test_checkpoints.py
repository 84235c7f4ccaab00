"""Checkpoint reading, arch detection, input-size resizing, export, safetensors, errors and the CLI handlers."""

from __future__ import annotations

import argparse
import os
import pickle
import re

import numpy as np
import pytest
import segment_anything
import torch
import torch.nn.functional as F

from samadapt.errors import UserError
from samadapt.models import build_sam, commands
from samadapt.models.checkpoints import (
    detect_arch,
    export_state_dict,
    load_safetensors,
    load_sam,
    load_state_dict,
    save_safetensors,
    save_sam_checkpoint,
    save_sam_safetensors,
)

torch.set_num_threads(2)
VIT_B_GLOBAL_BLOCKS = (2, 5, 8, 11)


def randomise(sam: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every float tensor: pos_embed and rel-pos tables start at zero in a fresh model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in sam.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    return sam


@pytest.fixture(scope="module")
def vit_b_1024(tmp_path_factory):
    """A randomised vit_b saved as an official 1024 px .pth: (path, state dict)."""
    sam = randomise(build_sam("vit_b"))
    path = save_sam_checkpoint(sam, "vit_b", tmp_path_factory.mktemp("vit_b") / "vit_b.pth")
    return path, {name: tensor.clone() for name, tensor in sam.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    sam = randomise(build_sam("vit_tiny"))
    return save_sam_checkpoint(sam, "vit_tiny", tmp_path_factory.mktemp("tiny") / "tiny.pth")


def linear_resample(table: torch.Tensor, length: int) -> torch.Tensor:
    """Reference: each column resampled with np.interp at half-pixel-centred positions (align_corners=False)."""
    old = table.shape[0]
    positions = np.clip((np.arange(length) + 0.5) * old / length - 0.5, 0, old - 1)
    columns = [np.interp(positions, np.arange(old), column) for column in table.double().numpy().T]
    return torch.from_numpy(np.stack(columns, axis=1)).float()


def image_embedding(sam: torch.nn.Module, size: int) -> torch.Tensor:
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return sam.image_encoder(image)


# ---- resize 1024 -> 256 -> 1024 ------------------------------------------------------------------------


def test_vit_b_1024_checkpoint_loads_at_256_like_a_hand_interpolated_reference(vit_b_1024):
    path, original = vit_b_1024
    small = load_sam("vit_b", path, image_size=256)
    loaded = small.state_dict()
    assert loaded["image_encoder.pos_embed"].shape == (1, 16, 16, 768)
    assert small.prompt_encoder.image_embedding_size == (16, 16)

    reference = dict(original)
    reference["image_encoder.pos_embed"] = F.interpolate(
        original["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(16, 16), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    for block in range(12):
        for axis in "hw":
            name = f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"
            if block in VIT_B_GLOBAL_BLOCKS:
                assert original[name].shape == (127, 64) and loaded[name].shape == (31, 64)
                reference[name] = linear_resample(original[name], 31)
            else:  # windowed blocks: 2 x 14 - 1, independent of the input size
                assert loaded[name].shape == (27, 64)
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6, msg=name)

    by_hand = build_sam("vit_b", 256).eval()
    by_hand.load_state_dict(reference)
    embedding = image_embedding(small, 256)
    assert embedding.shape == (1, 256, 16, 16)
    torch.testing.assert_close(embedding, image_embedding(by_hand, 256), rtol=0, atol=1e-5)


def test_vit_b_at_256_exports_official_1024_shapes_that_stock_sam_loads(vit_b_1024, tmp_path):
    path, original = vit_b_1024
    exported = export_state_dict(load_sam("vit_b", path, image_size=256), "vit_b")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in original.items()}
    size_dependent = re.compile(rf"pos_embed|blocks\.({'|'.join(map(str, VIT_B_GLOBAL_BLOCKS))})\.attn\.rel_pos")
    for name, tensor in original.items():
        if not size_dependent.search(name):
            assert torch.equal(exported[name], tensor), name
    torch.save(exported, tmp_path / "back.pth")
    stock = segment_anything.sam_model_registry["vit_b"](checkpoint=str(tmp_path / "back.pth"))
    assert stock.image_encoder.pos_embed.shape == (1, 64, 64, 768)


def test_safetensors_at_non_native_size_round_trip(tiny_pth, tmp_path):
    at_512 = load_sam("vit_tiny", tiny_pth, image_size=512)
    path = save_sam_safetensors(at_512, "vit_tiny", tmp_path / "tiny512.safetensors")
    tensors, metadata = load_safetensors(path)
    assert metadata["arch"] == "vit_tiny" and metadata["image_size"] == "512"
    assert tensors["image_encoder.pos_embed"].shape == (1, 32, 32, 192)
    again = load_sam("vit_tiny", path, image_size=512)
    for name, tensor in at_512.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert load_sam("vit_tiny", path).image_encoder.pos_embed.shape == (1, 16, 16, 192)


def test_safetensors_metadata_contradicting_shapes_is_refused(tiny_pth, tmp_path):
    path = save_safetensors(load_state_dict(tiny_pth), tmp_path / "bad.safetensors", {"image_size": "1024"})
    with pytest.raises(UserError, match="metadata says image_size=1024 but pos_embed is for 256 px"):
        load_sam("vit_tiny", path)


# ---- arch detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h", "vit_tiny"])
def test_detect_plain_vit_archs(arch):
    with torch.device("meta"):  # shapes only, no memory
        state_dict = build_sam(arch).state_dict()
    assert detect_arch(state_dict) == arch
    encoder_only = {k.removeprefix("image_encoder."): v for k, v in state_dict.items() if "image_encoder." in k}
    assert detect_arch(encoder_only) == arch


def test_detect_vit_t_and_unknown():
    assert detect_arch(build_sam("vit_t").state_dict()) == "vit_t"
    assert detect_arch({"image_encoder.patch_embed.proj.weight": torch.zeros(512, 3, 16, 16)}) is None
    assert detect_arch({"fc.weight": torch.zeros(2, 2)}) is None


# ---- reading and errors ------------------------------------------------------------------------------


def test_container_dicts_are_unwrapped(tiny_pth, tmp_path):
    state_dict = load_state_dict(tiny_pth)
    torch.save({"model": state_dict, "epoch": 3}, tmp_path / "wrapped.pth")
    assert load_state_dict(tmp_path / "wrapped.pth").keys() == state_dict.keys()
    torch.save({"state_dict": state_dict}, tmp_path / "wrapped.pt")
    load_sam("vit_tiny", tmp_path / "wrapped.pt")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.pth: checkpoint not found"):
        load_sam("vit_b", tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tiny_pth, tmp_path, suffix):
    if suffix == ".pth":
        source = tiny_pth
    else:
        source = save_safetensors(load_state_dict(tiny_pth), tmp_path / "t.safetensors", {})
    data = source.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated\S*: not a readable .* truncated or corrupt") as error:
        load_sam("vit_tiny", truncated)
    assert "\n" not in str(error.value)


def test_wrong_arch_names_the_detected_arch(tiny_pth):
    message = r"tiny\.pth: checkpoint looks like vit_tiny, but arch=vit_b — set arch=vit_tiny"
    with pytest.raises(UserError, match=message):
        load_sam("vit_b", tiny_pth)


class RunsShellOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"image_encoder.pos_embed": torch.zeros(1), "x": RunsShellOnUnpickle(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match=r"evil\.pth: refusing to execute code from an untrusted pickle"):
        load_sam("vit_b", path)
    assert not marker.exists()
    # Control: the payload is live — an unsafe load does run it.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(UserError, match=r"list\.pth: not a state dict \(found list\)"):
        load_state_dict(tmp_path / "list.pth")
    torch.save({"weight": torch.zeros(2), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(UserError, match=r"mixed\.pth: not a state dict — entry 'epoch' holds int"):
        load_state_dict(tmp_path / "mixed.pth")


def test_incomplete_and_foreign_state_dicts(tiny_pth, tmp_path):
    encoder_only = {k: v for k, v in load_state_dict(tiny_pth).items() if k.startswith("image_encoder.")}
    torch.save(encoder_only, tmp_path / "encoder.pth")
    with pytest.raises(UserError, match=r"encoder\.pth: \d+ missing keys \(e\.g\. prompt_encoder"):
        load_sam("vit_tiny", tmp_path / "encoder.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"resnet\.pth: not a SAM checkpoint of any known arch"):
        load_sam("vit_tiny", tmp_path / "resnet.pth")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_state_dict(tmp_path / "weights.ckpt")


# ---- `samadapt checkpoint info|convert` handlers ---------------------------------------------------------


def run_cli(*argv: str) -> int:
    """Parse like the samadapt CLI does (the lead wires add_parser into samadapt/cli.py) and run the handler."""
    parser = argparse.ArgumentParser(prog="samadapt")
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_info_prints_arch_size_params_and_sha256(tiny_pth, capsys):
    from samadapt.io import sha256_file

    assert run_cli("checkpoint", "info", str(tiny_pth)) == 0
    printed = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert printed["arch"].strip() == "vit_tiny" and printed["image_size"].strip() == "256 px"
    parameters = sum(p.numel() for p in build_sam("vit_tiny").parameters())
    assert int(printed["parameters"].replace(",", "")) == parameters
    assert printed["sha256"].strip() == sha256_file(tiny_pth)
    with pytest.raises(UserError, match="looks like vit_tiny, but arch=vit_h"):
        run_cli("checkpoint", "info", str(tiny_pth), "arch=vit_h")
    with pytest.raises(UserError, match="did you mean arch="):
        run_cli("checkpoint", "info", str(tiny_pth), "arc=vit_b")


def test_convert_pth_to_safetensors_and_back(tiny_pth, tmp_path, capsys):
    original = load_state_dict(tiny_pth)
    assert run_cli("checkpoint", "convert", str(tiny_pth), str(tmp_path / "same.safetensors")) == 0
    same, metadata = load_safetensors(tmp_path / "same.safetensors")
    assert metadata["image_size"] == "256" and all(torch.equal(same[k], v) for k, v in original.items())

    run_cli("checkpoint", "convert", str(tiny_pth), str(tmp_path / "big.safetensors"), "image_size=512")
    assert load_safetensors(tmp_path / "big.safetensors")[0]["image_encoder.pos_embed"].shape == (1, 32, 32, 192)
    run_cli("checkpoint", "convert", str(tmp_path / "big.safetensors"), str(tmp_path / "back.pth"))
    back = load_state_dict(tmp_path / "back.pth")
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in original.items()}
    assert "wrote" in capsys.readouterr().out

    with pytest.raises(UserError, match=r"keep the native 256 px shapes — write .safetensors for image_size=512"):
        run_cli("checkpoint", "convert", str(tiny_pth), str(tmp_path / "x.pth"), "image_size=512")
    with pytest.raises(UserError, match="unknown output format"):
        run_cli("checkpoint", "convert", str(tiny_pth), str(tmp_path / "x.onnx"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_with_nan_or_inf_weights_is_refused_naming_the_first_bad_tensor(tiny_pth, tmp_path, suffix):
    state_dict = load_state_dict(tiny_pth)
    names = list(state_dict)
    # An image_encoder key, then the last (mask_decoder) key: in this order in the state dict and in safetensors'
    # sorted keys alike.
    first, later = names[1], names[-1]
    assert first.startswith("image_encoder.") and later.startswith("mask_decoder.")
    state_dict[first].view(-1)[0] = float("nan")
    state_dict[later].view(-1)[-1] = float("inf")
    path = tmp_path / f"diverged{suffix}"
    if suffix == ".pth":
        torch.save(state_dict, path)
    else:
        save_safetensors(state_dict, path, {})
    message = rf"diverged\{suffix}: tensor {re.escape(first)} holds 1 NaN/Inf values .* use another checkpoint"
    with pytest.raises(UserError, match=message) as error:
        run_cli("checkpoint", "info", str(path))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=message):
        load_sam("vit_tiny", path)
