"""Read, check, load and export SAM weights (official ``.pth`` layout and our ``.safetensors``).

Official checkpoints (``sam_vit_b_01ec64.pth``, ``mobile_sam.pt``) are flat state dicts of ``Sam`` with
keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``. We read them with
``torch.load(weights_only=True)`` only, load them at any ``image_size`` (see :mod:`samadapt.models.resize`),
and export back to the official keys *and* shapes, so the stock ``sam_model_registry`` loads our files.
Our safetensors carry ``arch`` and ``image_size`` in their metadata and may be stored at any size.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from segment_anything.modeling import Sam

from samadapt.errors import UserError, one_line
from samadapt.io import atomic_path
from samadapt.models.pretrained import resolve_checkpoint
from samadapt.models.registry import ARCHS, VIT_SPECS, build_sam, check_arch, native_image_size
from samadapt.models.resize import resize_state_dict, stored_image_size

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
# Containers training scripts commonly wrap a state dict in ({"model": sd, "optimizer": ..., "epoch": 3}).
_CONTAINER_KEYS = ("model", "state_dict")
# TinyViT (vit_t) signature: stage embed dims 64/128/160/320 → 256-channel neck; LiteMedSAM's stem conv is 1 x 1.
_TINY_VIT_NECK = ("neck.0.weight", (256, 320, 1, 1))
_TINY_VIT_STEM = "patch_embed.seq.0.c.weight"


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's state dict (name → CPU tensor) and metadata (safetensors header; empty for .pth).

    Raises a one-line UserError naming the file for a missing, unreadable, truncated or corrupt file,
    a pickle that would need code execution, a file that holds no state dict, and NaN/Inf weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found — check the path (checkpoint=none for random init)")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        state_dict, metadata = load_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state_dict, metadata = _as_state_dict(_torch_load(path), path), {}
    else:
        raise UserError(f"{path}: unknown checkpoint format — expected .pth, .pt or .safetensors")
    _check_finite(state_dict, path)
    return state_dict, metadata


def _check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """UserError naming the first tensor with a NaN/Inf (weights of a diverged run would train and predict NaN).

    One float32 sum per tensor (~0.3 s for vit_b on 2 cores, a third of an ``isfinite`` pass): a non-finite
    element makes the sum non-finite; a finite sum that overflowed is told apart by the exact check."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor.sum(dtype=torch.float32)):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise UserError(f"{path}: tensor {name} holds {bad} NaN/Inf values (of {tensor.numel()}) — the "
                                "weights are corrupt, e.g. saved from a diverged run; use another checkpoint")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (.pth/.pt via ``torch.load(weights_only=True)``, or .safetensors)."""
    return read_checkpoint(path)[0]


def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            # Old-protocol pickles trigger a warning about protocol support; the outcome is what matters.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    except Exception as exc:  # torch raises many types for bad bytes (RuntimeError, EOFError, KeyError ...)
        message = one_line(exc)
        if "Weights only load failed" in message:
            # weights_only refuses any pickle that would import or call code (os.system, custom classes).
            called = re.search(r"GLOBAL (\S+)", message)
            detail = f" (it calls {called.group(1)})" if called else ""
            raise UserError(
                f"{path}: refusing to execute code from an untrusted pickle{detail} — "
                "ask for the weights as a plain state dict or .safetensors"
            ) from None
        reason = ": ".join(filter(None, (type(exc).__name__, message.split(". ")[0][:160])))
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({reason}) — "
            "download or copy it again"
        ) from None


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": sd}`` / ``{"state_dict": sd}`` (plain dicts only) and check name → tensor."""
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(
            f"{path}: not a state dict (found {type(obj).__name__}) — expected a mapping of names to tensors"
        )
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"{path}: not a state dict — entry {name!r} holds {type(value).__name__}, expected a tensor"
            )
    return dict(obj)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (on CPU) and string metadata of a .safetensors file; UserError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"{path}: not a readable .safetensors file, truncated or corrupt ({one_line(exc)}) — "
            "download or copy it again"
        ) from None
    if not tensors:
        raise UserError(f"{path}: holds no tensors — expected a state dict")
    return tensors, metadata


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) with string ``metadata``."""
    plain = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def detect_arch(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The arch a SAM state dict belongs to, from its keys and shapes; None if it matches none.

    Accepts full SAM keys (``image_encoder.…``) and image-encoder-only keys.
    Plain ViTs are told apart by patch-embedding width and block count, TinyViT by its stage layout, and
    LiteMedSAM's TinyViT (vit_t_lite) from MobileSAM's by its 1 x 1 stem convolution."""
    prefix = "image_encoder." if any(name.startswith("image_encoder.") for name in state_dict) else ""
    patch_proj = state_dict.get(prefix + "patch_embed.proj.weight")
    if patch_proj is not None:
        block = re.compile(rf"^{re.escape(prefix)}blocks\.(\d+)\.")
        depth = 1 + max((int(m.group(1)) for m in map(block.match, state_dict) if m), default=-1)
        for arch, spec in VIT_SPECS.items():
            if (spec.embed_dim, spec.depth) == (patch_proj.shape[0], depth):
                return arch
        return None
    neck_key, neck_shape = _TINY_VIT_NECK
    neck = state_dict.get(prefix + neck_key)
    has_conv_stage = prefix + "layers.0.blocks.0.conv1.c.weight" in state_dict
    if has_conv_stage and neck is not None and tuple(neck.shape) == neck_shape:
        stem = state_dict.get(prefix + _TINY_VIT_STEM)
        return "vit_t_lite" if stem is not None and tuple(stem.shape[-2:]) == (1, 1) else "vit_t"
    return None


def checkpoint_image_size(
    state_dict: dict[str, torch.Tensor], arch: str, metadata: dict[str, str], path: Path
) -> int:
    """Input size (px) the weights are stored for: ``pos_embed`` shape, else metadata, else native."""
    from_shapes = stored_image_size(state_dict, arch)
    declared = metadata.get("image_size")
    if declared is not None and not declared.isdigit():
        raise UserError(f"{path}: metadata image_size={declared!r} is not an integer")
    if from_shapes and declared and int(declared) != from_shapes:
        raise UserError(f"{path}: metadata says image_size={declared} but pos_embed is for {from_shapes} px")
    return from_shapes or (int(declared) if declared else native_image_size(arch))


def load_sam(arch: str, checkpoint: str | Path | None, image_size: int | None = None) -> Sam:
    """``Sam`` of ``arch`` for ``image_size`` px inputs (default native), in eval mode.

    ``checkpoint``: a file, or a named pretrained checkpoint (``litemedsam``, resolved and sha256-checked by
    :mod:`samadapt.models.pretrained`). Its weights are loaded strictly after resizing the size-dependent
    tensors from the stored size; a checkpoint of another arch is a UserError naming the arch it looks like."""
    check_arch(arch)
    image_size = image_size or native_image_size(arch)
    if checkpoint is None:
        return build_sam(arch, image_size).eval()
    # Check the file before building: a bad file should fail fast, not after allocating a vit_h.
    path = resolve_checkpoint(checkpoint)
    state_dict, metadata = read_checkpoint(path)
    check_checkpoint_arch(state_dict, arch, path)
    checkpoint_image_size(state_dict, arch, metadata, path)  # rejects metadata that contradicts shapes
    sam = build_sam(arch, image_size)
    _load_strict(sam, resize_state_dict(state_dict, arch, image_size), path)
    # eval() also refreshes TinyViT's cached attention biases (``ab``), computed from the weights at the
    # time of the call: loading into a model already in eval mode would leave them stale.
    return sam.eval()


def require_arch(state_dict: dict[str, torch.Tensor], path: Path) -> str:
    """The arch of ``state_dict``, or a UserError saying ``path`` is no SAM checkpoint we know."""
    detected = detect_arch(state_dict)
    if detected is None:
        raise UserError(
            f"{path}: not a SAM checkpoint of any known arch ({', '.join(ARCHS)}) — "
            "expected official SAM/MobileSAM keys such as image_encoder.patch_embed.*"
        )
    return detected


def check_checkpoint_arch(state_dict: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """UserError unless ``state_dict`` looks like ``arch`` (naming the arch it does look like)."""
    detected = require_arch(state_dict, path)
    if detected != arch:
        raise UserError(f"{path}: checkpoint looks like {detected}, but arch={arch} — set arch={detected}")


def _load_strict(sam: Sam, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    expected = sam.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    mismatched = [n for n in expected if n in state_dict and state_dict[n].shape != expected[n].shape]
    for problem, names in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", mismatched)):
        if names:
            raise UserError(
                f"{path}: {len(names)} {problem} keys (e.g. {', '.join(names[:3])}) — "
                "expected a full SAM state dict in the official key layout"
            )
    # Weights saved in another precision (e.g. fp16 safetensors) are cast to the model's dtype.
    state_dict = {name: state_dict[name].to(tensor.dtype) for name, tensor in expected.items()}
    # assign=True adopts the loaded tensors instead of copying them into the fresh ones (one copy less of
    # the weights in memory and time); requires_grad flags of the module are kept.
    sam.load_state_dict(state_dict, strict=True, assign=True)


def export_state_dict(sam: Sam, arch: str) -> dict[str, torch.Tensor]:
    """``sam``'s weights in the official key layout and shapes of ``arch`` at its native size (CPU)."""
    state_dict = {name: tensor.detach().cpu() for name, tensor in sam.state_dict().items()}
    if detect_arch(state_dict) != arch:
        raise ValueError(f"model is not a plain {arch} Sam (detected {detect_arch(state_dict)})")
    return resize_state_dict(state_dict, arch, native_image_size(arch))


def save_sam_checkpoint(sam: Sam, arch: str, path: str | Path) -> Path:
    """Atomically write ``sam`` as an official-layout ``.pth`` that stock ``sam_model_registry[arch]`` loads."""
    path = Path(path)
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise UserError(f"{path}: an official SAM checkpoint must end in .pth or .pt")
    with atomic_path(path) as tmp:
        torch.save(export_state_dict(sam, arch), tmp)
    return path


def sam_metadata(arch: str, image_size: int) -> dict[str, str]:
    """Metadata of a full-SAM safetensors file: which arch, and the input size its shapes are for."""
    return {"format": "pt", "arch": arch, "image_size": str(image_size)}


def save_sam_safetensors(sam: Sam, arch: str, path: str | Path) -> Path:
    """Write ``sam``'s weights as .safetensors at its current input size (recorded in the metadata)."""
    state_dict = dict(sam.state_dict())
    if detect_arch(state_dict) != arch:
        raise ValueError(f"model is not a plain {arch} Sam (detected {detect_arch(state_dict)})")
    return save_safetensors(state_dict, path, sam_metadata(arch, sam.image_encoder.img_size))
