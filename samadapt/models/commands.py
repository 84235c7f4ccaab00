"""``samadapt checkpoint info|convert``: inspect SAM weights and convert between .pth and .safetensors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from samadapt.config import describe, key, parse_config
from samadapt.errors import UserError
from samadapt.keys import Arch

# Buffers, not trained parameters: left out of the parameter count `info` prints.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "positional_encoding_gaussian_matrix")


@dataclass
class InfoKeys:
    arch: Arch | None = key(None, "also check that the file is this arch (error naming the arch it looks like)")


@dataclass
class ConvertKeys:
    image_size: int | None = key(
        None, "input size in px the .safetensors output is stored for (none = as stored); .pth is always native"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``checkpoint`` with ``info`` and ``convert`` to the CLI's subcommands."""
    parser = subparsers.add_parser("checkpoint", help="inspect SAM weights, convert .pth <-> .safetensors")
    commands = parser.add_subparsers(dest="checkpoint_command", metavar="{info,convert}", required=True)

    info = commands.add_parser(
        "info", help="detected arch, stored image size, input normalisation, parameter count, sha256",
        epilog="keys:\n" + describe(InfoKeys), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("file", help="SAM checkpoint (.pth/.pt official layout, or .safetensors), or a named "
                      "pretrained one (litemedsam)")
    info.add_argument("overrides", nargs="*", metavar="key=value")
    info.set_defaults(func=run_info)

    convert = commands.add_parser(
        "convert", help="rewrite weights as official .pth (native size) or .safetensors (any image_size)",
        epilog="keys:\n" + describe(ConvertKeys), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("input", help="SAM checkpoint to read (.pth/.pt/.safetensors)")
    convert.add_argument("output", help="file to write: .pth (official layout and shapes) or .safetensors")
    convert.add_argument("overrides", nargs="*", metavar="key=value")
    convert.set_defaults(func=run_convert)
    return parser


def run_info(args: argparse.Namespace) -> int:
    """Print what a checkpoint holds; exit 0, or UserError if unreadable or not ``arch=``."""
    from samadapt.io import sha256_file
    from samadapt.models.checkpoints import (
        check_checkpoint_arch,
        checkpoint_image_size,
        detect_arch,
        read_checkpoint,
    )
    from samadapt.models.normalisation import DESCRIPTIONS
    from samadapt.models.pretrained import PRETRAINED, resolve_checkpoint
    from samadapt.models.registry import input_norm

    keys = parse_config(InfoKeys, None, args.overrides)
    path = resolve_checkpoint(args.file)  # a pretrained name: its package file, sha256 already verified
    named = PRETRAINED.get(args.file)
    state_dict, metadata = read_checkpoint(path)
    if keys.arch:
        check_checkpoint_arch(state_dict, keys.arch, path)
    arch = detect_arch(state_dict)
    parameters = sum(t.numel() for name, t in state_dict.items() if not name.endswith(_BUFFER_SUFFIXES))
    lines = {
        **({"name": named.name, "description": named.description, "package": named.distribution} if named else {}),
        "file": str(path),
        "arch": arch or "unknown (not a known SAM layout)",
        "image_size": f"{checkpoint_image_size(state_dict, arch, metadata, path)} px" if arch else "unknown",
        "input_norm": f"{input_norm(arch)}: {DESCRIPTIONS[input_norm(arch)]}" if arch else "unknown",
        "tensors": str(len(state_dict)),
        "parameters": f"{parameters:,}",
        "sha256": sha256_file(path) + (" (verified: the pinned sha256 of this name)" if named else ""),
    }
    lines.update({f"metadata.{name}": value for name, value in sorted(metadata.items())})
    width = max(map(len, lines)) + 2
    for name, value in lines.items():
        print(f"{name + ':':<{width}}{value}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Load ``input`` strictly (checks it fully), write ``output`` in the format its suffix names."""
    from samadapt.models.checkpoints import (
        SAFETENSORS_SUFFIX,
        TORCH_SUFFIXES,
        checkpoint_image_size,
        load_sam,
        read_checkpoint,
        require_arch,
        save_sam_checkpoint,
        save_sam_safetensors,
    )
    from samadapt.models.registry import native_image_size

    keys = parse_config(ConvertKeys, None, args.overrides)
    from samadapt.models.pretrained import resolve_checkpoint

    source, target = resolve_checkpoint(args.input), Path(args.output)
    suffix = target.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise UserError(f"{target}: unknown output format — name it .pth, .pt or .safetensors")
    state_dict, metadata = read_checkpoint(source)
    arch = require_arch(state_dict, source)
    if suffix in TORCH_SUFFIXES and keys.image_size not in (None, native_image_size(arch)):
        raise UserError(
            f"{target}: official .pth checkpoints keep the native {native_image_size(arch)} px shapes — "
            f"write .safetensors for image_size={keys.image_size}"
        )
    image_size = keys.image_size or checkpoint_image_size(state_dict, arch, metadata, source)
    del state_dict  # load_sam reads the file again; do not hold two copies of a vit_h in memory
    sam = load_sam(arch, source, image_size)
    if suffix == SAFETENSORS_SUFFIX:
        save_sam_safetensors(sam, arch, target)
        print(f"wrote {target} ({arch}, {image_size} px, safetensors)")
    else:
        save_sam_checkpoint(sam, arch, target)
        print(f"wrote {target} ({arch}, official layout at {native_image_size(arch)} px)")
    return 0
