"""Whole-volume inference: slices in batches through a :class:`SamSegmenter`, back to the volume grid.

Used by ``samadapt predict``, ``samadapt evaluate`` and the fine-tune stage's validation, so the three
see the same preprocessing, padding and plane as training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from samadapt.data import Case, Preprocessing, VolumeSlices
from samadapt.embedding_store import EmbeddingStore
from samadapt.errors import UserError
from samadapt.keys import PromptKeys, preprocessing
from samadapt.models.checkpoints import load_sam
from samadapt.models.fast_inference import fast_encoder
from samadapt.models.finetuned import load_finetune_output
from samadapt.models.pretrained import resolve_checkpoint
from samadapt.models.prompts import prompts_from_labels
from samadapt.models.segmenter import SamSegmenter
from samadapt.models.unet import load_baseline_output
from samadapt.propagation import boxes_from_labels, propagate_boxes
from samadapt.seeds import derived_seed
from samadapt.stage_record import recorded_stage


@dataclass(frozen=True)
class PromptSettings:
    """Which prompts inference draws from the reference labels: ``mode`` none (automatic), box or point,
    drawn as ``keys`` say, seeded per batch from ``seed``."""

    mode: str
    keys: PromptKeys = field(default_factory=PromptKeys)
    seed: int = 0
    volume_box: bool = False  # box mode: one 3-D box per case and class, propagated (samadapt.propagation)

    @property
    def protocol(self) -> str:
        """The evaluation protocol these prompts follow, in words (recorded in the evaluate stage output)."""
        return PROMPT_PROTOCOLS["volume_box" if self.mode == "box" and self.volume_box else self.mode]


PROMPT_PROTOCOLS = {
    "none": "automatic (no prompts)",
    "box": "per-slice reference boxes (MedSAM): the bounding box of each class in each slice of the reference",
    "point": "per-slice reference points: points drawn inside each class in each slice of the reference",
    "volume_box": "one 3-D reference box per case and class, propagated from its middle slice by the neighbouring "
                  "slice's prediction (CVPR 2024 MedSAM-on-laptop protocol)",
}


AUTOMATIC = PromptSettings("none")


def prompt_generator(seed: int, *batch: object) -> torch.Generator:
    """A generator fixed by the seed and the batch's identity: a batch's prompts do not depend on what ran
    before it (a resumed run, another process, another batch size upstream draw the same)."""
    return torch.Generator().manual_seed(derived_seed(seed, "prompts", *batch))


@torch.no_grad()
def predict_slices(model, slices: VolumeSlices, batch_size: int, prompts: PromptSettings,
                   device: torch.device | str = "cpu", probabilities: bool = False,
                   store: EmbeddingStore | None = None) -> np.ndarray:
    """Run ``model`` (a SamSegmenter, possibly peft-wrapped) over every slice of ``slices``.

    Returns uint8 labels N x S x S, or with ``probabilities`` float16 N x K x S x S class probabilities.
    Prompted modes derive prompts from ``slices``' reference labels (evaluation only). ``store``: take and keep
    the image embeddings there (:mod:`samadapt.embedding_store`; prompted modes encode prompted slices only).
    On the CPU a TinyViT encoder runs as its fast copy (:mod:`samadapt.models.fast_inference`; same masks)."""
    with fast_encoder(model):
        return _predict_slices(model, slices, batch_size, prompts, device, probabilities, store)


def _predict_slices(model, slices: VolumeSlices, batch_size: int, prompts: PromptSettings,
                    device: torch.device | str, probabilities: bool, store: EmbeddingStore | None) -> np.ndarray:
    if prompts.mode == "box" and prompts.volume_box and not probabilities:
        labels = slices.labels
        if labels is None:
            raise ValueError("3-D box prompts from the reference need reference labels")
        boxes = boxes_from_labels(labels, model.num_classes)
        return propagate_boxes(model, slices, boxes, batch_size, device, store)
    was_training = model.training
    model.eval()
    outputs = []
    for start, images, labels in slices.chunks(batch_size):
        x = torch.from_numpy(images)[:, None].to(device)  # [0, 1] slices: the model normalises them itself
        batch_prompts = None
        if prompts.mode != "none":
            if labels is None:
                raise ValueError("prompted inference needs reference labels to derive prompts from")
            rng = prompt_generator(prompts.seed, slices.image_path, start)
            batch_prompts = prompts_from_labels(prompts.mode, torch.from_numpy(labels), model.num_classes, rng,
                                                box_jitter=prompts.keys.box_jitter,
                                                num_positive=prompts.keys.num_points,
                                                num_negative=prompts.keys.num_negative).to(device)
        if store is None:
            logits = model(x, batch_prompts)
        else:
            logits = model(None, batch_prompts, embeddings=_stored(store, slices, start, batch_prompts, batch_size,
                                                                    device))
        present = None if batch_prompts is None else batch_prompts.present
        if probabilities:
            outputs.append(model.probabilities(logits, present).to(torch.float16).cpu())
        else:
            outputs.append(model.predict_labels(logits, present).to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy()


def _stored(store: EmbeddingStore, slices: VolumeSlices, start: int, prompts, batch_size: int,
            device: torch.device | str) -> torch.Tensor:
    """Embeddings B x 256 x g x g of the batch from ``start`` (zeros for slices without a prompt, whose logits
    are all "absent" whatever their embedding)."""
    count = min(batch_size, len(slices) - start)
    needed = [start + i for i in range(count) if prompts is None or bool(prompts.present[i].any())]
    grid = store.model.sam.prompt_encoder.image_embedding_size
    batch = torch.zeros(count, store.model.sam.prompt_encoder.embed_dim, *grid)
    for index, embedding in store.embeddings(slices, needed, batch_size, device).items():
        batch[index - start] = embedding
    return batch.to(device)


def predict_case(model, case: Case, prep: Preprocessing, batch_size: int, prompts: PromptSettings,
                 device: torch.device | str = "cpu", num_classes: int | None = None,
                 store: EmbeddingStore | None = None) -> tuple[np.ndarray, VolumeSlices]:
    """Predicted labels of ``case`` on its original voxel grid (z, y, x), and its VolumeSlices (whose
    ``reference`` is the case's label, checked against the image, when the case has one)."""
    slices = VolumeSlices(case.image, prep, case.modality, label=case.label, num_classes=num_classes,
                          series_uid=case.series_uid)
    return slices.to_volume(predict_slices(model, slices, batch_size, prompts, device, store=store)), slices


@dataclass
class LoadedModel:
    """A model ready for inference with everything needed to feed it like in training."""

    model: torch.nn.Module
    prep: Preprocessing
    num_classes: int
    prompt: str
    train_modalities: list[str]


def load_model(config, prompt: str | None = None, default_num_classes: int | None = None) -> LoadedModel:
    """``config.model`` is a finetune or baseline output folder (everything from its stage_output.json) or a plain
    SAM checkpoint or a named pretrained one such as ``litemedsam`` (zero-shot: needs box/point prompts; arch,
    image_size, preprocessing from config, and ``config.num_classes`` or else ``default_num_classes``)."""
    path = Path(config.model)
    if path.is_dir() and recorded_stage(path) == "baseline":  # a U-Net baseline folder: automatic masks only
        unet = load_baseline_output(path, prompt)
        return LoadedModel(unet.model, unet.prep, unet.keys.num_classes, "none", unet.train_modalities)
    if path.is_dir():
        loaded = load_finetune_output(path)
        trained = loaded.keys.prompt
        chosen = prompt or trained
        if (chosen == "none") != (trained == "none"):
            raise UserError(f"prompt={chosen} but {path} was trained with prompt={trained} — "
                            "automatic (none) and prompted (box/point) models are different heads")
        loaded.model.prompt = chosen
        modalities = (loaded.record.get("metrics") or {}).get("train_modalities", [])
        return LoadedModel(loaded.model, loaded.prep, loaded.keys.num_classes, chosen, modalities)
    path = resolve_checkpoint(config.model)  # a named pretrained checkpoint (litemedsam) → its verified file
    if not path.is_file():
        raise UserError(f"{path}: model not found — pass a finetune output folder or a SAM checkpoint")
    if prompt in (None, "none"):
        raise UserError(f"{path}: a plain SAM checkpoint segments only with prompts — set prompt=box or prompt=point")
    num_classes = config.num_classes or default_num_classes
    if num_classes is None:
        raise UserError(f"{path}: a plain SAM checkpoint needs num_classes= (classes incl. background) or a "
                        "labels.json beside the manifest")
    sam = load_sam(config.arch, path, image_size=config.image_size)
    model = SamSegmenter(sam, num_classes, prompt).eval()
    return LoadedModel(model, preprocessing(config), num_classes, prompt, [])
