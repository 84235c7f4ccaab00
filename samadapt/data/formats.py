"""File formats samadapt reads and writes, by name: the one list of each (torch- and ITK-free)."""

from __future__ import annotations

from pathlib import Path

# Image volumes SimpleITK reads by file name (longest first, so ".nii.gz" wins over ".nii"); DICOM series are
# folders. ``.nhdr``/``.mhd`` are headers whose voxels sit in a separate file.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# What predictions and masks are written as (header-only formats become the single-file variant).
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SINGLE_FILE = {".nhdr": ".nrrd", ".mhd": ".mha"}
MANIFEST_SUFFIXES = (".jsonl", ".csv")


def volume_suffix(name: str) -> str | None:
    """``"sub-01.nii.gz"`` → ``".nii.gz"``; None for names that are no volume file (e.g. a DICOM folder)."""
    return next((suffix for suffix in VOLUME_SUFFIXES if name.endswith(suffix)), None)


def volume_stem(path: str | Path) -> str:
    """A volume's name without its format suffix (``sub-01.nii.gz`` → ``sub-01``; a folder keeps its name)."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def output_name(image: str | Path, case_id: str | None = None) -> str:
    """A mask's file name for ``image``, in its format (DICOM series and unknown formats → NIfTI)."""
    suffix = volume_suffix(Path(image).name)
    stem = case_id or volume_stem(image)
    return stem + (SINGLE_FILE.get(suffix, suffix) if suffix else ".nii.gz")
