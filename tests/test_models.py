"""Round trips: samadapt-built SAMs saved as official .pth load in the stock registries with identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import segment_anything
import torch

from samadapt.models import ARCHS, build_sam, native_image_size
from samadapt.models.checkpoints import export_state_dict, load_sam, save_sam_checkpoint

torch.set_num_threads(2)


def randomise(sam: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight and statistic: pos_embed, rel-pos tables and TinyViT attention biases start
    at zero, so a test on a fresh model could not see them being lost or misplaced."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sam.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    return sam


def outputs(sam: torch.nn.Module, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Image embedding (1 x 256 x g x g), low-res masks (1 x 3 x 4g x 4g) and IoU scores for a fixed
    random image with one point and one box prompt."""
    size = sam.image_encoder.img_size
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, size, size, generator=generator)
    points = (torch.tensor([[[0.3 * size, 0.6 * size]]]), torch.tensor([[1]]))
    box = torch.tensor([[0.2 * size, 0.25 * size, 0.7 * size, 0.8 * size]])
    with torch.no_grad():
        embedding = sam.image_encoder(image)
        sparse, dense = sam.prompt_encoder(points=points, boxes=box, masks=None)
        masks, iou = sam.mask_decoder(
            image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )
    return embedding, masks, iou


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for x, y in zip(outputs(a), outputs(b), strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def stock_registry(arch: str) -> dict:
    if arch == "vit_t":
        from mobile_sam import sam_model_registry

        return sam_model_registry
    return segment_anything.sam_model_registry


def round_trip_through_stock(arch: str, tmp_path) -> Path:
    """Random ``arch`` → official .pth → stock registry and samadapt: same tensors, same outputs.
    Returns the checkpoint's path."""
    original = randomise(build_sam(arch))
    path = save_sam_checkpoint(original, arch, tmp_path / f"{arch}.pth")
    ours = load_sam(arch, path)
    for name, tensor in original.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    # mobile_sam's builder calls eval() *before* loading weights, so TinyViT keeps attention biases
    # cached from the random init; eval() again recomputes them (MobileSAM's README does the same).
    stock = stock_registry(arch)[arch](checkpoint=str(path)).eval()
    assert_same_outputs(stock, ours)
    return path


def test_arch_list_matches_design():
    assert set(ARCHS) == {"vit_b", "vit_l", "vit_h", "vit_t", "vit_t_lite", "vit_tiny"}
    assert native_image_size("vit_tiny") == 256 and native_image_size("vit_b") == 1024


def test_vit_tiny_round_trip_through_pth(tmp_path):
    original = randomise(build_sam("vit_tiny")).eval()
    path = save_sam_checkpoint(original, "vit_tiny", tmp_path / "tiny.pth")
    loaded = load_sam("vit_tiny", path)
    assert_same_outputs(original, loaded)
    embedding, masks, iou = outputs(loaded)
    assert embedding.shape == (1, 256, 16, 16) and masks.shape == (1, 3, 64, 64) and iou.shape == (1, 3)


def test_vit_b_round_trip_through_stock_segment_anything(tmp_path):
    round_trip_through_stock("vit_b", tmp_path)


def test_vit_t_round_trip_through_stock_mobile_sam_and_runs_at_256(tmp_path):
    path = round_trip_through_stock("vit_t", tmp_path)
    # TinyViT has no size-dependent weights: the same file loads at 256 px and gives a 16 x 16 grid.
    small = load_sam("vit_t", path, image_size=256)
    embedding, masks, _ = outputs(small)
    assert embedding.shape == (1, 256, 16, 16) and masks.shape == (1, 3, 64, 64)
    exported = export_state_dict(small, "vit_t")
    reference = torch.load(path, map_location="cpu", weights_only=True)
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in reference.items())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_l", "vit_h"])
def test_large_round_trip_through_stock_segment_anything(arch, tmp_path):
    round_trip_through_stock(arch, tmp_path)
