"""SAM as a K-class segmenter: automatic (no prompt) class masks, or SAM's own box/point decoding.

``SamSegmenter.sam`` is the SAM model in the official key layout; everything outside ``sam.`` (the
``class_head`` of the automatic mode) is new and always trained (see :mod:`samadapt.models.strategies`).

Outputs and loss convention (MONAI ``DiceCELoss``), decided by the mode so the stage needs no branches:

================  ==============================  =============================================
mode              logits                          loss (``loss_fn``)
================  ==============================  =============================================
none, K > 2       B x K x S x S (softmax)         ``softmax=True, to_onehot_y=True`` on labels
none, K = 2       B x 1 x S x S (sigmoid)         ``sigmoid=True`` on ``labels > 0``
box / point       B x (K-1) x S x S (sigmoid per  ``sigmoid=True`` on the prompted (slice, class)
                  prompted class; absent classes  masks only: N x 1 x S x S, one Dice per prompt
                  hold ``ABSENT_LOGIT``)
================  ==============================  =============================================
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from torch import nn

from samadapt.errors import UserError
from samadapt.keys import PROMPT_MODES
from samadapt.models.checkpoints import detect_arch
from samadapt.models.forward import encode_images
from samadapt.models.normalisation import to_model_input
from samadapt.models.prompts import Prompts
from samadapt.models.registry import input_norm

PROMPT_CHANNELS = 256  # channels of SAM's image embeddings (the prompt/decoder width)
# Logit of a class that got no prompt: sigmoid → 0 (even in fp16), so it never wins a pixel.
ABSENT_LOGIT = -1e4


class ClassHead(nn.Module):
    """The automatic mode's new parts: C class tokens (C x 256) and one hypernetwork MLP per class.

    Every class starts as SAM's mask token 0 and its hypernetwork MLP 0 (the single-mask output SAM
    uses without multimask), so training starts from SAM's own mask prediction; classes diverge because
    each one's token and MLP get their own class's gradient.
    """

    def __init__(self, mask_decoder: MaskDecoder, num_outputs: int) -> None:
        super().__init__()
        token = mask_decoder.mask_tokens.weight[:1].detach().clone()
        self.tokens = nn.Parameter(token.repeat(num_outputs, 1))
        self.hypernetworks = nn.ModuleList(
            copy.deepcopy(mask_decoder.output_hypernetworks_mlps[0]) for _ in range(num_outputs)
        )
        self.requires_grad_(True)  # new modules are always trained, even if SAM was frozen before


class SamSegmenter(nn.Module):
    """SAM fine-tuned for K classes (K includes background: binary = 2).

    prompt: ``none`` (automatic multi-class masks from learned class tokens), ``box`` or ``point``
    (SAM's own decoder path, one prompt per present foreground class, see :mod:`~.prompts`).
    grad_checkpointing: recompute the image encoder's blocks in backward (see ``encode_images``).
    ``input_norm``: how :meth:`embed` turns [0, 1] slices into encoder input — the normalisation the arch of
    ``sam`` declares (``registry.input_norm``; found from its weights' layout, so no caller can forget it).
    """

    def __init__(
        self, sam: nn.Module, num_classes: int, prompt: str = "none", grad_checkpointing: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise UserError(f"num_classes={num_classes}: must be at least 2 (background + one class)")
        if prompt not in PROMPT_MODES:
            raise UserError(f"prompt={prompt!r} is not known — choose one of {', '.join(PROMPT_MODES)}")
        self.sam = sam
        self.num_classes = num_classes
        self.prompt = prompt
        self.grad_checkpointing = grad_checkpointing
        arch = detect_arch(dict(sam.state_dict()))
        self.input_norm = input_norm(arch) if arch else "sam"
        if prompt == "none":
            self.class_head = ClassHead(sam.mask_decoder, self.num_outputs)

    def train(self, mode: bool = True) -> SamSegmenter:
        """Training mode for everything but BatchNorm (TinyViT's convolutions): its running statistics stay the
        pretrained ones. They are buffers, not trained tensors — a fine-tune saves only what it trains, so
        statistics drifting on small batches would differ between the validated model and the reloaded one."""
        super().train(mode)
        for module in self.sam.image_encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    @property
    def num_outputs(self) -> int:
        """Logit channels C: K (softmax) or 1 (binary sigmoid) without prompts, K-1 with prompts."""
        if self.prompt != "none":
            return self.num_classes - 1
        return 1 if self.num_classes == 2 else self.num_classes

    @property
    def sigmoid(self) -> bool:
        """Whether logit channels are independent sigmoids (binary or prompted) rather than a softmax."""
        return self.num_outputs != self.num_classes

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: slices B x 1 x S x S in [0, 1] → image embeddings B x 256 x g x g (g = S/16; S/4 for
        LiteMedSAM), normalised first as the encoder expects (``input_norm``; the one place that does it)."""
        return encode_images(self.sam.image_encoder, to_model_input(images, self.input_norm), self.grad_checkpointing)

    def forward(
        self,
        images: torch.Tensor | None = None,
        prompts: Prompts | None = None,
        *,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images: slices B x 1 x S x S in [0, 1] → logits B x C x S x S (see the module docstring for C).

        Pass ``embeddings`` (B x 256 x g x g, e.g. cached for a frozen encoder) instead of ``images`` to
        decode only: under DDP/accelerate the wrapped model must be *called* (not ``.decode``) so that
        gradients are synchronised.
        """
        if (images is None) == (embeddings is None):
            raise ValueError("pass exactly one of images or embeddings")
        if embeddings is None:
            embeddings = self._embed_prompted(images, prompts)
        return self.decode(embeddings, prompts)

    def _embed_prompted(self, images: torch.Tensor, prompts: Prompts | None) -> torch.Tensor:
        """``embed(images)``; at inference with prompts, only the images that have one (an image without any
        prompt decodes to all-absent logits whatever its embedding, so its encoder pass — seconds per slice for
        LiteMedSAM on a CPU — is skipped and its embedding left at zero)."""
        if self.prompt == "none" or prompts is None or torch.is_grad_enabled():
            return self.embed(images)
        needed = prompts.present.any(1)
        if bool(needed.all()):
            return self.embed(images)
        grid = self.sam.prompt_encoder.image_embedding_size
        embeddings = images.new_zeros((images.shape[0], PROMPT_CHANNELS, *grid))
        if bool(needed.any()):
            embeddings[needed] = self.embed(images[needed]).to(embeddings.dtype)
        return embeddings

    def decode(self, embeddings: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        """embeddings: B x 256 x g x g (``embed``'s output, or cached ones) → logits B x C x S x S.

        The decoder predicts at 4g px (S/4; S for LiteMedSAM); logits are upsampled bilinearly to the S x S
        input like ``Sam.postprocess_masks``. Prompted modes need ``prompts`` (B x (K-1) entries, see ``Prompts``).
        """
        if self.prompt == "none":
            low_res = self._decode_automatic(embeddings)
        elif prompts is None:
            raise ValueError(f"prompt={self.prompt} needs prompts (see samadapt.models.prompts)")
        else:
            low_res = self._decode_prompted(embeddings, prompts)
        return F.interpolate(low_res, self.sam.prompt_encoder.input_image_size, mode="bilinear", align_corners=False)

    def _decode_automatic(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B x 256 x g x g → B x C x 4g x 4g: ``MaskDecoder.predict_masks`` for a batch of images.

        Upstream (segment_anything/modeling/mask_decoder.py, ``predict_masks``, lines 120-144) builds
        its tokens for a batch of *prompts* and ``repeat_interleave``s one image's embedding over them;
        with no prompts and B images it would run B x B copies. Here each image gets its own token row
        (iou token + class tokens in place of the mask tokens) and the same transformer, upscaling and
        hypernetwork product follow line by line. The no-prompt embeddings come from SAM's own prompt
        encoder (sparse: none; dense: the learned ``no_mask_embed``).
        """
        decoder, prompt_encoder = self.sam.mask_decoder, self.sam.prompt_encoder
        batch = embeddings.shape[0]
        sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)  # 1 x 0 x 256, 1 x 256 x g x g
        output_tokens = torch.cat([decoder.iou_token.weight, self.class_head.tokens], dim=0)  # (1 + C) x 256
        tokens = torch.cat([output_tokens, sparse[0]], dim=0).unsqueeze(0).expand(batch, -1, -1)
        src = embeddings + dense
        pos_src = prompt_encoder.get_dense_pe().expand(batch, -1, -1, -1)
        _, channels, height, width = src.shape
        hs, src = decoder.transformer(src, pos_src, tokens)
        class_tokens_out = hs[:, 1 : 1 + self.num_outputs, :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, channels, height, width))
        hyper_in = torch.stack(
            [mlp(class_tokens_out[:, i, :]) for i, mlp in enumerate(self.class_head.hypernetworks)], dim=1
        )
        return (hyper_in @ upscaled.flatten(2)).view(batch, -1, *upscaled.shape[-2:])

    def _decode_prompted(self, embeddings: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """B x 256 x g x g → B x (K-1) x 4g x 4g through SAM's stock prompt encoder and mask decoder.

        The present (image, class) prompts are embedded in one batch, then ``sam.mask_decoder`` runs once
        per image on that image's prompts (its input layout: one image, a batch of prompts) with
        ``multimask_output=False`` (mask token 0). Classes without a prompt hold ``ABSENT_LOGIT``.
        """
        decoder, prompt_encoder = self.sam.mask_decoder, self.sam.prompt_encoder
        present = prompts.present
        if prompts.boxes is not None:
            sparse, dense = prompt_encoder(points=None, boxes=prompts.boxes[present].float(), masks=None)
        else:
            points = (prompts.point_coords[present].float(), prompts.point_labels[present])
            sparse, dense = prompt_encoder(points=points, boxes=None, masks=None)
        image_pe = prompt_encoder.get_dense_pe()
        counts = present.sum(1).tolist()
        masks = [  # rows of present.nonzero(): image by image, classes in order
            decoder(
                image_embeddings=embeddings[image : image + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=image_sparse,
                dense_prompt_embeddings=image_dense,
                multimask_output=False,
            )[0][:, 0]
            for image, (image_sparse, image_dense) in enumerate(zip(sparse.split(counts), dense.split(counts)))
            if counts[image]
        ]
        grid = embeddings.shape[-1] * 4  # output_upscaling: two stride-2 transposed convolutions
        dtype = masks[0].dtype if masks else embeddings.dtype  # autocast may decode in bf16/fp16
        logits = embeddings.new_full((embeddings.shape[0], self.num_outputs, grid, grid), ABSENT_LOGIT, dtype=dtype)
        if masks:
            logits[present] = torch.cat(masks)
        return logits

    def predict_labels(self, logits: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """logits: B x C x S x S → label map B x S x S int64 (0 = background).

        Softmax: argmax. Binary: sigmoid > 0.5. Prompted: among the prompted classes (``present``
        B x (K-1)), the class with the highest logit where its sigmoid > 0.5, else background.
        """
        if not self.sigmoid:
            return logits.argmax(1)
        logits = self._mask_absent(logits, present)
        best, index = logits.max(1)
        return torch.where(best > 0, index + 1, 0)

    def probabilities(self, logits: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """logits: B x C x S x S → class probabilities B x K x S x S.

        Softmax: softmax. Sigmoid outputs: foreground channels are the sigmoids (0 for absent classes) and
        background is 1 - the largest of them, so ``probabilities(...).argmax(1)`` equals
        ``predict_labels`` (ties aside). With several prompted classes the channels need not sum to 1.
        """
        if not self.sigmoid:
            return logits.softmax(1)
        foreground = self._mask_absent(logits, present).sigmoid()
        return torch.cat([1 - foreground.amax(1, keepdim=True), foreground], dim=1)

    @torch.no_grad()
    def batch_dice(self, logits: torch.Tensor, labels: torch.Tensor, present: torch.Tensor | None = None) -> float:
        """Mean foreground Dice of this batch's predictions (logits B x C x S x S, labels B x S x S), over the
        (slice, class) pairs where prediction or label has the class; NaN if there are none."""
        from monai.metrics import compute_dice  # lazily: monai costs ~1.8 s of every inference-only CLI call

        predicted = F.one_hot(self.predict_labels(logits.detach(), present), self.num_classes).permute(0, 3, 1, 2)
        reference = F.one_hot(labels.long(), self.num_classes).permute(0, 3, 1, 2)
        dice = compute_dice(predicted, reference, include_background=False, ignore_empty=False)
        both_empty = (predicted[:, 1:].sum((2, 3)) == 0) & (reference[:, 1:].sum((2, 3)) == 0)
        return float(torch.nanmean(dice.masked_fill(both_empty, float("nan"))))

    def _mask_absent(self, logits: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        if self.prompt == "none":
            return logits
        if present is None:
            raise ValueError(f"prompt={self.prompt}: pass prompts.present to tell prompted classes apart")
        return logits.masked_fill(~present[..., None, None], ABSENT_LOGIT)

    def loss_fn(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        present: torch.Tensor | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """MONAI ``DiceCELoss`` under this mode's convention (module docstring) → scalar.

        logits: B x C x S x S (``forward``'s output); labels: B x S x S int; present: B x (K-1) bool of the
        prompts (prompted modes). class_weights: K weights (background first) for cross-entropy and Dice,
        softmax mode only. A prompted batch without any present class gives a zero loss.
        """
        from monai.losses import DiceCELoss  # lazily, as in batch_dice

        if class_weights is not None and self.sigmoid:
            raise UserError("class_weights needs prompt=none and num_classes > 2 (softmax) — drop class_weights")
        if not self.sigmoid:
            weight = (
                None
                if class_weights is None
                else torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
            )
            return DiceCELoss(softmax=True, to_onehot_y=True, weight=weight)(logits, labels.unsqueeze(1))
        if self.prompt == "none":
            return DiceCELoss(sigmoid=True)(logits, (labels > 0).unsqueeze(1).to(logits.dtype))
        if present is None:
            raise ValueError(f"prompt={self.prompt}: loss_fn needs prompts.present")
        if not present.any():
            return torch.zeros((), device=logits.device, requires_grad=True)
        classes = torch.arange(1, self.num_classes, device=labels.device).view(1, -1, 1, 1)
        targets = (labels.unsqueeze(1) == classes)[present].unsqueeze(1).to(logits.dtype)  # N x 1 x S x S
        return DiceCELoss(sigmoid=True)(logits[present].unsqueeze(1), targets)
