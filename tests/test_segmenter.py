"""SamSegmenter and encode_images on the tiny SAM: shapes, equality with segment_anything's own code
paths, loss conventions, and that a few optimiser steps fit a fixed tiny batch."""

import pytest
import torch
import torch.nn.functional as F

from samadapt.errors import UserError
from samadapt.models import build_sam
from samadapt.models.forward import encode_images
from samadapt.models.prompts import prompts_from_labels
from samadapt.models.segmenter import ABSENT_LOGIT, SamSegmenter

SIZE = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Decoder-sized ops gain nothing from a second thread, and on a shared 2-core machine it oversubscribes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised_sam(size: int = SIZE, seed: int = 0):
    """A tiny SAM whose zero-initialised pos-embed and rel-pos tables are random, so they take part."""
    torch.manual_seed(seed)
    sam = build_sam("vit_tiny", size)
    with torch.no_grad():
        for name, param in sam.image_encoder.named_parameters():
            if name == "pos_embed" or "rel_pos" in name:
                param.normal_(std=0.1)
    return sam


@pytest.fixture(scope="module")
def sam():
    return randomised_sam().eval()


def labels_batch(size: int, num_classes: int) -> torch.Tensor:
    """2 x size x size: image 0 holds class 1 and the last class, image 1 only the last class."""
    labels = torch.zeros(2, size, size, dtype=torch.int64)
    s = size // 8
    labels[0, 2 * s : 4 * s, 2 * s : 6 * s] = 1
    labels[0, 5 * s : 7 * s, 5 * s : 7 * s] = num_classes - 1
    labels[1, 4 * s : 7 * s, 1 * s : 3 * s] = num_classes - 1
    return labels


def test_encode_images_equals_the_encoder_and_checkpointing_keeps_gradients():
    encoder = randomised_sam().image_encoder.train()
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(encode_images(encoder, images), encoder(images), rtol=0, atol=0)
    gradients = []
    for checkpointing in (False, True):
        encoder.zero_grad()
        inputs = images.clone().requires_grad_(True)
        out = encode_images(encoder, inputs, grad_checkpointing=checkpointing)
        assert out.shape == (2, 256, SIZE // 16, SIZE // 16)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        gradients.append([inputs.grad] + [p.grad.clone() for p in encoder.parameters()])
    assert gradients[0][0].abs().sum() > 0
    for plain, recomputed in zip(*gradients):
        torch.testing.assert_close(recomputed, plain)


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("mode", ["none", "box", "point"])
def test_shapes_and_gradients_in_every_mode(sam, num_classes, mode):
    segmenter = SamSegmenter(sam, num_classes, mode)
    if mode == "none":
        # Every class starts as SAM's mask token 0, so fresh class logits tie up to rounding; make them differ
        # so the argmax comparison below means something.
        with torch.no_grad():
            segmenter.class_head.tokens.add_(torch.randn(segmenter.class_head.tokens.shape,
                                                         generator=torch.Generator().manual_seed(1)))
    labels = labels_batch(SIZE, num_classes)
    prompts = prompts_from_labels(mode, labels, num_classes, torch.Generator().manual_seed(0), num_negative=1)
    present = None if prompts is None else prompts.present
    sam.zero_grad()
    logits = segmenter(torch.randn(2, 3, SIZE, SIZE), prompts)
    channels = {"none": 1 if num_classes == 2 else num_classes}.get(mode, num_classes - 1)
    assert logits.shape == (2, channels, SIZE, SIZE)
    predicted = segmenter.predict_labels(logits, present)
    probabilities = segmenter.probabilities(logits, present)
    assert predicted.shape == (2, SIZE, SIZE) and predicted.dtype == torch.int64
    assert probabilities.shape == (2, num_classes, SIZE, SIZE)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    # argmax of the probabilities is the prediction, except where the top two differ only by rounding
    top_two = probabilities.topk(2, dim=1).values
    decided = (top_two[:, 0] - top_two[:, 1]) > 1e-5
    assert decided.float().mean() > 0.9
    assert torch.equal(probabilities.argmax(1)[decided], predicted[decided])
    segmenter.loss_fn(logits, labels, present).backward()
    assert sam.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert sam.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0


def test_automatic_path_equals_stock_predict_masks_per_image(sam):
    """With the class head set to SAM's 4 mask tokens/MLPs, the batched path is upstream's, image by image."""
    segmenter = SamSegmenter(sam, 4, "none")
    decoder, prompt_encoder = sam.mask_decoder, sam.prompt_encoder
    with torch.no_grad():
        segmenter.class_head.tokens.copy_(decoder.mask_tokens.weight)
        for mine, theirs in zip(segmenter.class_head.hypernetworks, decoder.output_hypernetworks_mlps):
            mine.load_state_dict(theirs.state_dict())
        embeddings = segmenter.embed(torch.randn(3, 3, SIZE, SIZE))
        logits = segmenter.decode(embeddings)
        with pytest.raises(ValueError, match="exactly one"):
            segmenter(torch.randn(1, 3, SIZE, SIZE), embeddings=embeddings)
        for i in range(3):
            sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
            masks, _ = decoder.predict_masks(embeddings[i : i + 1], prompt_encoder.get_dense_pe(), sparse, dense)
            expected = F.interpolate(masks, (SIZE, SIZE), mode="bilinear", align_corners=False)
            torch.testing.assert_close(logits[i : i + 1], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[0, 0], logits[0, 1])  # the four outputs really differ


def test_box_path_equals_stock_mask_decoder_per_image(sam):
    segmenter = SamSegmenter(sam, 4, "box")
    labels = labels_batch(SIZE, 4)
    prompts = prompts_from_labels("box", labels, 4, torch.Generator().manual_seed(0), box_jitter=0.1)
    assert prompts.present.tolist() == [[True, False, True], [False, False, True]]
    with torch.no_grad():
        embeddings = segmenter.embed(torch.randn(2, 3, SIZE, SIZE))
        logits = segmenter.decode(embeddings, prompts)
        for image in range(2):
            classes = prompts.present[image].nonzero()[:, 0]
            sparse, dense = sam.prompt_encoder(points=None, boxes=prompts.boxes[image, classes], masks=None)
            masks, _ = sam.mask_decoder(
                image_embeddings=embeddings[image : image + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            expected = F.interpolate(masks, (SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
            torch.testing.assert_close(logits[image, classes], expected, rtol=1e-4, atol=1e-5)
    assert (logits[~prompts.present] == ABSENT_LOGIT).all()


def test_prompted_labels_take_the_best_prompted_class_above_half():
    segmenter = SamSegmenter(build_sam("vit_tiny", 64), 4, "box")
    present = torch.tensor([[True, False, True]])
    # Three pixels: class 1 wins; only the absent class 2 is positive → background; class 3 beats class 1.
    logits = torch.tensor([[[2.0, -1.0, 1.0]], [[5.0, 9.0, 9.0]], [[1.0, -3.0, 3.0]]]).unsqueeze(0)  # 1 x 3 x 1 x 3
    assert segmenter.predict_labels(logits, present).tolist() == [[[1, 0, 3]]]
    probabilities = segmenter.probabilities(logits, present)
    assert probabilities[0, 2].max() == 0  # absent class
    # 1 - the best prompted sigmoid
    torch.testing.assert_close(probabilities[0, 0, 0, 1], 1 - torch.sigmoid(torch.tensor(-1.0)))


def test_loss_uses_only_prompted_classes_and_supports_class_weights():
    segmenter = SamSegmenter(build_sam("vit_tiny", 64), 4, "point")
    labels = labels_batch(64, 4)
    present = torch.tensor([[True, False, True], [False, False, True]])
    logits = torch.randn(2, 3, 64, 64)
    changed = logits.clone()
    changed[~present] = 7.0
    assert segmenter.loss_fn(changed, labels, present) == segmenter.loss_fn(logits, labels, present)
    assert segmenter.loss_fn(logits + 1, labels, present) != segmenter.loss_fn(logits, labels, present)
    nothing = segmenter.loss_fn(logits, labels, torch.zeros_like(present))
    assert nothing.item() == 0 and nothing.requires_grad
    with pytest.raises(UserError, match="class_weights"):
        segmenter.loss_fn(logits, labels, present, class_weights=[1, 2, 2, 2])
    automatic = SamSegmenter(build_sam("vit_tiny", 64), 4, "none")
    logits = torch.randn(2, 4, 64, 64)
    assert automatic.loss_fn(logits, labels, class_weights=[0.1, 1, 5, 1]) != automatic.loss_fn(logits, labels)


def test_class_head_starts_from_mask_token_zero_and_lives_outside_sam():
    sam = build_sam("vit_tiny", 64)
    official = set(sam.state_dict())
    sam.requires_grad_(False)
    segmenter = SamSegmenter(sam, 3, "none")
    head = segmenter.class_head
    assert torch.equal(head.tokens, sam.mask_decoder.mask_tokens.weight[:1].expand(3, -1))
    reference = sam.mask_decoder.output_hypernetworks_mlps[0].state_dict()
    for mlp in head.hypernetworks:
        assert all(torch.equal(value, reference[name]) for name, value in mlp.state_dict().items())
    assert all(p.requires_grad for p in head.parameters())
    keys = set(segmenter.state_dict())
    assert {k.removeprefix("sam.") for k in keys if k.startswith("sam.")} == official
    assert {k.split(".")[0] for k in keys} == {"sam", "class_head"}
    assert {k.split(".")[0] for k in SamSegmenter(sam, 3, "box").state_dict()} == {"sam"}
    with pytest.raises(UserError, match="prompt="):
        SamSegmenter(sam, 3, "scribble")
    with pytest.raises(UserError, match="num_classes"):
        SamSegmenter(sam, 1)


@pytest.mark.parametrize("num_classes,mode", [(3, "none"), (2, "none"), (3, "box")])
def test_adamw_steps_fit_a_fixed_tiny_batch(num_classes, mode):
    """Frozen encoder, cached embeddings (the stage's decoder-only path), 128 px to keep it quick."""
    size = 128
    segmenter = SamSegmenter(randomised_sam(size), num_classes, mode)
    labels = labels_batch(size, num_classes)
    images = 0.3 * torch.randn(2, 3, size, size) + labels.unsqueeze(1).float()  # intensity tells the class
    prompts = prompts_from_labels(mode, labels, num_classes)
    present = None if prompts is None else prompts.present
    segmenter.sam.image_encoder.requires_grad_(False)
    with torch.no_grad():
        embeddings = segmenter.embed(images)
    optimizer = torch.optim.AdamW([p for p in segmenter.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = segmenter.loss_fn(segmenter(prompts=prompts, embeddings=embeddings), labels, present)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("mode", ["box", "point"])
def test_slices_without_foreground_get_no_prompt_and_predict_background(mode):
    segmenter = SamSegmenter(build_sam("vit_tiny", 64), 3, mode)
    labels = torch.zeros(2, 64, 64, dtype=torch.int64)
    prompts = prompts_from_labels(mode, labels, 3)
    assert not prompts.present.any()
    logits = segmenter(torch.randn(2, 3, 64, 64), prompts)
    assert (logits == ABSENT_LOGIT).all()
    assert (segmenter.predict_labels(logits, prompts.present) == 0).all()
    loss = segmenter.loss_fn(logits, labels, prompts.present)
    loss.backward()
    assert loss.item() == 0


def test_batch_dice_counts_false_positives_and_skips_absent_classes():
    segmenter = SamSegmenter(build_sam("vit_tiny", 64), 3, "none")
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, :32], labels[1, :, :10] = 1, 2
    logits = torch.full((2, 3, 64, 64), -5.0)
    logits[:, 0] = 5.0
    logits[0, 1, :32] = 10.0  # slice 0: class 1 exactly right
    logits[1, 1, :, :5] = 10.0  # slice 1: class 1 false positive, class 2 missed
    # (slice 0, class 1) = 1, (slice 1, class 1) = 0, (slice 1, class 2) = 0; (slice 0, class 2) is in neither
    assert segmenter.batch_dice(logits, labels) == pytest.approx(1 / 3)
