"""ChunkedAttention is SAM's global attention computed in query chunks: same outputs and gradients, less memory."""

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from samadapt.models import build_sam
from samadapt.models.attention import ChunkedAttention


def random_attention(grid: int) -> Attention:
    torch.manual_seed(0)
    attention = Attention(96, num_heads=4, use_rel_pos=True, input_size=(grid, grid))
    with torch.no_grad():  # zero-initialised tables would hide a wrong bias
        attention.rel_pos_h.normal_(std=0.5)
        attention.rel_pos_w.normal_(std=0.5)
    return attention


@pytest.mark.parametrize("chunk", [100, 512, 5000])
def test_chunks_give_sams_outputs_and_gradients(chunk):
    stock = random_attention(30)
    chunked = ChunkedAttention(copy.deepcopy(stock), chunk=chunk)
    x = torch.randn(2, 30, 30, 96)
    x_stock, x_chunked = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    weights = torch.randn(2, 30, 30, 96)
    (stock(x_stock) * weights).sum().backward()
    (chunked(x_chunked) * weights).sum().backward()
    with torch.no_grad():
        if chunk >= 900:  # one chunk: SAM's operations in SAM's order
            assert torch.equal(chunked(x), stock(x))
        torch.testing.assert_close(chunked(x), stock(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_chunked.grad, x_stock.grad, rtol=1e-4, atol=1e-5)
    for (name, mine), (_, theirs) in zip(chunked.named_parameters(), stock.named_parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_built_encoders_keep_sams_keys_and_use_chunks_in_global_blocks_only():
    sam = build_sam("vit_b", 256)
    blocks = sam.image_encoder.blocks
    assert [isinstance(b.attn, ChunkedAttention) for b in blocks] == [b.window_size == 0 for b in blocks]
    assert sum(isinstance(b.attn, ChunkedAttention) for b in blocks) == 4
    assert "image_encoder.blocks.2.attn.qkv.weight" in sam.state_dict()
    assert "image_encoder.blocks.2.attn.rel_pos_h" in sam.state_dict()
