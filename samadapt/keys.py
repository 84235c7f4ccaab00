"""Config keys that more than one command shares, each declared once (``samadapt <cmd> --help`` lists them).

Kept free of torch imports so ``--help`` is instant. Stage configs inherit these groups
(``@dataclass(kw_only=True)``), so a key means the same thing in every stage; a stage that needs another
default takes the group through :func:`samadapt.config.with_defaults` (same key, type and help). Each choice
list is a ``Literal`` and its tuple is derived from it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from samadapt.config import group, key, required
from samadapt.data.augment import AugmentConfig
from samadapt.data.preprocessing import Preprocessing, preprocessing_fields
from samadapt.errors import UserError

# vit_t_lite: LiteMedSAM's TinyViT (MobileSAM's encoder with a 1 x 1, stride-1 stem: 256 px in, 64 x 64 grid out).
Arch = Literal["vit_b", "vit_l", "vit_h", "vit_t", "vit_t_lite", "vit_tiny"]
ARCHS: tuple[str, ...] = get_args(Arch)
# MobileSAM's hierarchical TinyViT encoders (conv stages, BatchNorm): the others are segment_anything's plain ViT.
TINY_VIT_ARCHS: tuple[str, ...] = ("vit_t", "vit_t_lite")
# Archs whose encoder runs at one input size only (px): the stride-1 stem makes every other size a new model.
FIXED_IMAGE_SIZE: dict[str, int] = {"vit_t_lite": 256}
PromptMode = Literal["none", "box", "point"]
PROMPT_MODES: tuple[str, ...] = get_args(PromptMode)
Strategy = Literal["frozen", "full", "lora", "adapter"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
_BLOCKS_SYNTAX = re.compile(r"all|last\d+|\d+(,\d+)*")


@dataclass(kw_only=True)
class ArchKeys:
    arch: Arch = key(
        "vit_b",
        "SAM backbone: vit_b, vit_l, vit_h, vit_t (MobileSAM TinyViT), vit_t_lite (LiteMedSAM TinyViT, 256 px), "
        "vit_tiny (tests); a named checkpoint (checkpoint=litemedsam) sets it",
    )
    image_size: int = key(
        1024, "input size in px (256/512 resize pos-embed and rel-pos tables of the weights)", bounds="[16, 4096]"
    )


@dataclass(kw_only=True)
class ModelKeys(ArchKeys):
    checkpoint: str | None = key(
        None,
        "SAM-format weights (.pth official layout or .safetensors), a named pretrained checkpoint shipped in an "
        "installed package (litemedsam; see samadapt checkpoint info NAME); none = random initialisation",
    )


@dataclass(kw_only=True)
class SeedKeys:
    seed: int = key(0, "seed for weights, data order, augmentations and prompts drawn from labels", bounds="[0, inf)")


@dataclass(kw_only=True)
class BatchKeys:
    batch_size: int = key(
        2, "images (slices) per forward pass and process; in training per micro-batch", bounds="[1, inf)"
    )


@dataclass(kw_only=True)
class TrainKeys(SeedKeys, BatchKeys):
    steps: int = key(
        1000, "optimiser steps (each = batch_size x grad_accumulation x processes images)", bounds="[1, inf)"
    )
    lr: float = key(1e-4, "peak learning rate (AdamW)", bounds="(0, 10]")
    weight_decay: float = key(
        0.05, "AdamW weight decay (not applied to norms, biases, pos-embeddings)", bounds="[0, inf)"
    )
    warmup_steps: int = key(0, "linear warm-up steps before the cosine decay", bounds="[0, inf)")
    max_grad_norm: float | None = key(1.0, "clip gradients to this norm; none = no clipping", bounds="(0, inf)")
    grad_accumulation: int = key(1, "micro-batches per optimiser step", bounds="[1, inf)")
    mixed_precision: Literal["no", "bf16", "fp16"] = key("no", "autocast precision (fp16 needs a GPU)")
    grad_checkpointing: bool = key(False, "recompute encoder blocks in backward to save memory")
    num_workers: int = key(0, "DataLoader worker processes per training process", bounds="[0, 64]")
    save_every: int = key(200, "steps between resumable training states in out/state/step_<N>/", bounds="[1, inf)")
    keep_states: int = key(2, "how many training states to keep (oldest deleted)", bounds="[1, inf)")
    resume: bool = key(True, "resume from the newest out/state/step_<N>/ if one exists")
    log_every: int = key(10, "steps between rows of out/metrics.csv", bounds="[1, inf)")
    tensorboard: bool = key(True, "also write each metrics row to out/tensorboard/ (if tensorboard is installed)")


@dataclass(kw_only=True)
class LayerDecayKeys:
    layer_decay: float = key(
        1.0, "layer-wise lr decay for plain-ViT encoder blocks: block i of N trains at lr x layer_decay^(N-i) "
        "(1.0 = none, 0.75 typical)", bounds="(0, 1]"
    )


def check_layer_decay(config: Any) -> None:
    """``layer_decay`` scales numbered plain-ViT blocks (:func:`samadapt.training.layer_lr_scale`): refused for a
    TinyViT, whose stages it does not know, and for a frozen encoder, which has no lr to scale."""
    if config.layer_decay == 1:
        return
    if config.arch in TINY_VIT_ARCHS:
        raise ValueError(f"layer_decay={config.layer_decay} scales plain-ViT blocks; arch={config.arch} is a TinyViT "
                         "— set layer_decay=1")
    if getattr(config, "encoder", None) == "frozen":
        raise ValueError(f"layer_decay={config.layer_decay} scales the encoder's lr, but encoder=frozen trains none "
                         "of it — set layer_decay=1 or train the encoder (encoder=lora, adapter or full)")


@dataclass(kw_only=True)
class AugmentKeys:
    augment: AugmentConfig = group(AugmentConfig, "2D augmentations (per batch on the device, or per slice with MONAI)")


@dataclass
class LoraKeys:
    rank: int = key(8, "LoRA rank r", bounds="[1, 1024]")
    alpha: float = key(16.0, "LoRA alpha (the update is scaled by alpha / rank)", bounds="(0, inf)")
    dropout: float = key(0.0, "dropout on the LoRA input", bounds="[0, 1)")
    targets: str = key(
        "qkv,proj",
        "comma list of Linear layers: qkv (attention q/k/v), proj (attention output), mlp; or a regex "
        "matched against the end of a layer name (e.g. mlp\\.lin1)",
    )
    blocks: str = key("all", "image-encoder blocks with LoRA: all, lastN (e.g. last4) or indices (0,1,5)")

    def __post_init__(self) -> None:
        if not _BLOCKS_SYNTAX.fullmatch(self.blocks.replace(" ", "")):
            raise ValueError(f"lora.blocks={self.blocks!r}: use all, lastN (e.g. last4) or indices like 0,1,5")
        for token in target_tokens(self.targets):
            try:
                re.compile(token)
            except re.error as exc:
                raise ValueError(f"lora.targets: {token!r} is not a valid regex ({exc})") from None

    def block_indices(self, count: int) -> list[int]:
        """Indices of the chosen blocks among ``count`` encoder blocks."""
        spec = self.blocks.replace(" ", "")
        if spec == "all":
            return list(range(count))
        if spec.startswith("last"):
            last = int(spec[4:])
            if not 1 <= last <= count:
                raise UserError(f"lora.blocks={spec}: the image encoder has {count} blocks — use last1..last{count}")
            return list(range(count - last, count))
        indices = sorted({int(i) for i in spec.split(",")})
        if indices[-1] >= count:
            raise UserError(f"lora.blocks={spec}: the image encoder has {count} blocks (0–{count - 1})")
        return indices


def target_tokens(targets: str) -> list[str]:
    tokens = [t.strip() for t in targets.split(",") if t.strip()]
    if not tokens:
        raise ValueError("lora.targets is empty: use e.g. qkv,proj")
    return tokens


@dataclass
class AdapterKeys:
    bottleneck: int = key(64, "hidden width of each bottleneck adapter", bounds="[1, 4096]")
    scale: float = key(1.0, "adapter output scale", bounds="[0, inf)")


@dataclass(kw_only=True)
class StrategyKeys:
    encoder: Strategy = key(
        "lora", "image encoder: frozen, full, lora or adapter (the prompt encoder is always frozen)"
    )
    decoder: Strategy = key("full", "mask decoder: frozen, full, lora or adapter")
    lora: LoraKeys = group(LoraKeys, "LoRA (encoder/decoder=lora)")
    adapter: AdapterKeys = group(AdapterKeys, "bottleneck adapters (encoder/decoder=adapter)")


@dataclass(kw_only=True)
class ClassKeys:
    num_classes: int = required("number of classes including background (binary = 2)", bounds="[2, 256]")


@dataclass(kw_only=True)
class SegmenterKeys(ModelKeys, StrategyKeys, ClassKeys):
    """What a fine-tuned model *is*: rebuilt from a finetune folder's recorded config (see
    :func:`samadapt.models.finetuned.load_finetune_output`), so the core never imports the finetune stage."""

    prompt: PromptMode = key("none", "none = automatic masks for all classes; box / point = prompts from the labels")


@dataclass(kw_only=True)
class UNetKeys(ClassKeys):
    """What a baseline U-Net *is* (MONAI's 2D ``UNet``): rebuilt from a baseline folder's recorded config (see
    :func:`samadapt.models.unet.load_baseline_output`), so the core never imports the baseline stage."""

    # 6 levels reach across a 256-px slice (a 4-level one mistook the eyes for brain on the demo) at ~0.44 M params
    channels: str = key("8,16,32,64,128,128", "U-Net feature channels per level, comma list (each level halves "
                        "the size)")
    res_units: int = key(0, "residual units per U-Net block (0 = two plain conv layers)", bounds="[0, 8]")
    dropout: float = key(0.0, "dropout inside the U-Net blocks", bounds="[0, 1)")

    def __post_init__(self) -> None:
        if len(self.channel_list) < 2:
            raise ValueError(f"channels={self.channels!r}: give at least two levels, e.g. 8,16,32,64")

    @property
    def channel_list(self) -> tuple[int, ...]:
        try:
            return tuple(int(c) for c in self.channels.split(","))
        except ValueError:
            raise ValueError(f"channels={self.channels!r}: expected integers like 8,16,32,64") from None


@dataclass(kw_only=True)
class PromptKeys:
    """How box/point prompts are drawn from reference labels (training, validation, prompted evaluation)."""

    box_jitter: float = key(
        0.1, "box prompts: random shift of each side, as a fraction of the box size", bounds="[0, 1]"
    )
    num_points: int = key(1, "point prompts: positive points per class", bounds="[1, 64]")
    num_negative: int = key(0, "point prompts: negative points per class", bounds="[0, 64]")


DataKeys = dataclasses.make_dataclass(
    "DataKeys",
    [
        ("split", str | None, key(None, "use only manifest rows of this split (train/val/test); none = all rows")),
        ("cache_dir", str | None, key(None, "slice cache folder; none = $SAMADAPT_CACHE or ~/.cache/samadapt")),
        *preprocessing_fields(exclude=("image_size",)),  # image_size is a model key (ArchKeys)
    ],
    kw_only=True,
)
DataKeys.__doc__ = "Which manifest rows to read and how volumes become slices (see samadapt.data)."


def resolve_model_keys(config: Any) -> None:
    """Settle ``arch`` and ``image_size`` before anything is sliced: a named pretrained checkpoint
    (``checkpoint=`` or ``model=``, e.g. litemedsam) sets the arch it is, and a fixed-size arch (vit_t_lite)
    its input size — each only while the key still has its default; a contradicting explicit value is an error."""
    from samadapt.models.pretrained import PRETRAINED  # torch-free table

    if not hasattr(config, "arch"):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    names = [getattr(config, k) for k in ("checkpoint", "model") if isinstance(getattr(config, k, None), str)]
    entry = next((PRETRAINED[n] for n in names if n in PRETRAINED), None)
    if entry is not None and config.arch != entry.arch:
        if config.arch != defaults["arch"]:
            raise ValueError(f"arch={config.arch}: the checkpoint {entry.name} is a {entry.arch} model — "
                             f"drop arch= (it is inferred) or set arch={entry.arch}")
        config.arch = entry.arch
    fixed = FIXED_IMAGE_SIZE.get(config.arch)
    if fixed is not None and config.image_size != fixed:
        if config.image_size != defaults["image_size"]:
            raise ValueError(f"image_size={config.image_size}: arch={config.arch} runs at its native {fixed} px "
                             f"only — drop image_size= or set image_size={fixed}")
        config.image_size = fixed


def check_slicing(config: Any, one_plane: bool) -> None:
    """The preprocessing keys' own checks (e.g. the window) when the config is built, not at the first slice; a
    model trains, validates and segments one plane (``plane=all`` is for pretraining). The model keys are
    settled first (:func:`resolve_model_keys`): the model decides the slice size."""
    resolve_model_keys(config)
    preprocessing(config)
    if one_plane and config.plane == "all":
        raise ValueError("plane=all is for pretraining (SSL on every plane); a model trains and segments one "
                         "plane — set plane=axial, coronal or sagittal")


def preprocessing(config: Any) -> Preprocessing:
    """The stage config's :class:`Preprocessing` (its own checks become one-line UserErrors)."""
    try:
        return Preprocessing(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Preprocessing)})
    except ValueError as exc:
        raise UserError(str(exc)) from None
