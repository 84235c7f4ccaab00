"""Faster CPU inference for TinyViT image encoders (LiteMedSAM's ``vit_t_lite``, MobileSAM's ``vit_t``).

LiteMedSAM's stride-1 stem runs its first MBConv stage at the full 256 x 256 px with 256 hidden channels, so
the encoder is bound by memory traffic over large activations (profiled at batch 8 on a 2-core AVX2 CPU:
convolutions 38 %, linear layers 14 %, GELU 12 %, copies 11 %, BatchNorm 8 %, softmax 3.5 %). An
inference-only copy of the encoder removes passes over those activations without changing the function:

* every ``Conv2d_BN`` becomes one ``Conv2d`` with the BatchNorm folded in (upstream ``Conv2d_BN.fuse``): the
  eval-mode BatchNorm is an affine map per channel, so folding it saves a full read and write of each
  conv output;
* TinyViT's explicit ``softmax(q k^T * scale + bias) v`` becomes ``F.scaled_dot_product_attention`` with the
  same bias as ``attn_mask`` (the fused kernel never writes the scaled scores and the softmax separately).
* convolution weights and activations are channels-last (NHWC): oneDNN's convolutions then run without
  reordering every activation to and from its blocked layout, and TinyViT's token <-> image reshapes around
  its depthwise convolutions become views. Of the three, this is the one that measurably pays on this CPU.

Results differ from the eager encoder only by fp32 rounding (embeddings agree to ~1e-5; the masks of
``tests/test_fast_inference.py`` are identical). The copy is rebuilt whenever a weight of the original
changes, and it serves only inference on the CPU with autograd off (:func:`applies`).

On by default wherever it applies: ``samadapt.inference.predict_slices`` and
``samadapt.embedding_store.encode_slices`` (evaluate, predict, propagation, the embedding cache) run inside
:func:`fast_encoder`. Measured on the 2-core AVX2 CPU (``bench/bench_litemedsam.py``, real LiteMedSAM, a batch of
8 demo slices, median of 3): 23.8 s eager → 16.9 s fast, **1.40 x**; box-prompted masks of 8 demo brain slices
identical (0 of 95 691 foreground voxels differ). Channels-last gives most of it; folding and fused attention
alone measured ~1.0-1.3 x. ``torch.compile`` (inductor, ``freezing``) of this copy reached ~2.1 x over eager
but took ~5 min to compile and recompiles per batch size, so it is not used.
"""

from __future__ import annotations

import copy
import types
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.models.registry import tiny_vit_module


def _sdpa_attention(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT ``Attention.forward`` (eval) with the fused kernel: x B x N x C → B x N x C."""
    batch, tokens, _ = x.shape
    q, k, v = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, -1).split(
        [self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B x heads x N x d
    # self.ab: the heads x N x N relative-position bias that eval mode caches (Attention.train)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.ab, scale=self.scale)
    return self.proj(x.transpose(1, 2).reshape(batch, tokens, self.dh))


def inference_copy(encoder: nn.Module) -> nn.Module:
    """An eval-mode copy of a TinyViT ``encoder``: BatchNorms folded, fused attention, channels-last (see the module
    docstring); same input and output: B x 3 x S x S → B x 256 x g x g. The original is not modified."""
    tiny_vit = tiny_vit_module()
    fast = copy.deepcopy(encoder).eval()
    vars(fast).pop("forward", None)  # fast_encoder's patch on the original: the copy runs its class's forward
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, tiny_vit.Conv2d_BN):
                setattr(module, name, child.fuse())
        if isinstance(module, tiny_vit.Attention):
            module.forward = types.MethodType(_sdpa_attention, module)
    return _ChannelsLast(fast.to(memory_format=torch.channels_last).requires_grad_(False))


class _ChannelsLast(nn.Module):
    """Runs ``encoder`` (channels-last weights) on a channels-last view of its input; the B x 256 x g x g output
    is returned contiguous (NCHW), as the eager encoder's, for the decoder and ``np.save`` of the store."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images.contiguous(memory_format=torch.channels_last)).contiguous()


def _weights_state(encoder: nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: changes when any weight is updated."""
    return tuple((t.data_ptr(), t._version) for t in encoder.state_dict(keep_vars=True).values())


def applies(encoder: nn.Module, images: torch.Tensor) -> bool:
    """Whether the fast copy serves this call: a plain TinyViT encoder in eval mode, on the CPU, with autograd off.
    Plain: no hooks (bottleneck adapters) and only TinyViT's own modules (no peft LoRA layers), which the copy
    would have to carry over."""
    if not isinstance(encoder, tiny_vit_module().TinyViT) or encoder.training or images.device.type != "cpu":
        return False
    own = ("mobile_sam.", "torch.nn.", "timm.", "samadapt.models.registry")  # TinyViT's parts and our subclasses
    return not torch.is_grad_enabled() and all(
        type(m).__module__.startswith(own) and not (m._forward_hooks or m._forward_pre_hooks)
        for m in encoder.modules())


# encoder → (its weights' state, its fast copy). Weak keys: a copy dies with its encoder, and a later encoder
# is never served a stale copy (as id() keys could be, once freed weights are reallocated at the same addresses).
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_encoder_for(encoder: nn.Module) -> nn.Module:
    """The fast copy of ``encoder``, rebuilt when its weights changed since the last call."""
    state = _weights_state(encoder)
    cached = _COPIES.get(encoder)
    if cached is None or cached[0] != state:
        _COPIES.clear()  # one encoder at a time: a copy holds the model's weights again
        _COPIES[encoder] = cached = (state, inference_copy(encoder))
    return cached[1]


def encode(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images: B x 3 x S x S model input → embeddings B x 256 x g x g, through the fast copy where it
    :func:`applies`, else through ``encoder`` itself."""
    return fast_encoder_for(encoder)(images) if applies(encoder, images) else encoder(images)


@contextmanager
def fast_encoder(model):
    """Within the block, ``model.sam.image_encoder`` (a SamSegmenter's) runs through :func:`encode`: every
    inference path (``model(x, prompts)``, ``model.embed``, propagation) gets the fast copy without knowing.
    Patched on the instance rather than swapped as a module, so ``state_dict`` and fingerprints never see it."""
    encoder = getattr(getattr(model, "sam", None), "image_encoder", None)  # None: not SAM (a U-Net baseline)
    if encoder is None or "forward" in vars(encoder):  # or already inside a fast_encoder block
        yield
        return
    original = encoder.forward
    encoder.forward = lambda images: (fast_encoder_for(encoder)(images) if applies(encoder, images)
                                      else original(images))
    try:
        yield
    finally:
        del encoder.forward
