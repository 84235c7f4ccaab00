"""The training-cost estimate (samadapt.cost): FLOP counts checked against hand-computed answers, and the
ordering of the study's strategies on LiteMedSAM that the counts must show."""

from __future__ import annotations

import pytest
import torch

from samadapt.cost import flop_counter

torch.set_num_threads(1)


@pytest.mark.parametrize("groups", [1, 8])
def test_convolution_backward_counts_follow_groups(groups):
    """A 3 x 3 convolution, 8 -> 8 channels on 1 x 8 x 16 x 16 (padding 1): forward = 2 x 16*16 x 9 x 8 x 8/groups
    multiply-adds; backward = the input gradient + the weight gradient, each as much as the forward (torch's own
    formula counts the weight gradient of a depthwise convolution 8x too high)."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    forward_flops = 2 * 16 * 16 * 9 * 8 * (8 // groups)
    with flop_counter() as forward:
        y = conv(x)
    with flop_counter() as backward:
        y.sum().backward()
    assert forward.get_total_flops() == forward_flops
    assert backward.get_total_flops() == 2 * forward_flops


def test_litemedsam_strategies_cost_in_the_expected_order():
    """One 256-px training image of LiteMedSAM: a full encoder's backward is ~2x its forward (weight and input
    gradients), LoRA's ~1x (input gradients only), a frozen encoder with the embedding cache trains the decoder only,
    and grad checkpointing adds the recomputed encoder forward."""
    from samadapt.config import parse_config
    from samadapt.cost import finetune_flops
    from samadapt.finetune.config import FinetuneConfig

    def flops(encoder: str, decoder: str, *extra: str):
        keys = ["data=demo:brain", "out=unused", "num_classes=2", "checkpoint=litemedsam", "prompt=box",
                f"encoder={encoder}", f"decoder={decoder}", "batch_size=1", *extra]
        return finetune_flops(parse_config(FinetuneConfig, None, keys))

    full, lora, frozen = flops("full", "full"), flops("lora", "lora"), flops("frozen", "full")
    recomputed = flops("lora", "lora", "grad_checkpointing=true")
    assert 1.8 < full.backward / full.forward < 2.2
    assert 0.8 < lora.backward / lora.forward < 1.2
    assert frozen.step < 0.1 * lora.step < 0.1 * full.step
    assert frozen.encoder_per_slice > 5 * frozen.step  # the encoder (75 GFLOP), once per cached slice
    assert lora.step < recomputed.step < lora.step + lora.forward
