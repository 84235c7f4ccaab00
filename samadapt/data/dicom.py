"""DICOM series folders: pick one series, check its slices (readable, equal, evenly spaced), read it.

GDCM and ITK's series reader stack whatever files they can parse: a truncated slice, a gap or two slices at one
position become a silently wrong volume. Every such problem here is a one-line :class:`UserError` naming the
folder and the slice.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samadapt.data.itk import header_of, itk_reason
from samadapt.errors import UserError

_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_SLICE_TOLERANCE = 0.01  # of the slice spacing: positions further off are a missing or misplaced slice


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """Series instance UIDs of the DICOM files directly inside ``folder`` (may be empty)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def dicom_series_files(folder: str | os.PathLike, series_uid: str | None = None) -> tuple[list[str], dict]:
    """The files of one DICOM series in slice order (along the slice normal) and its header (``read_header``'s
    dict, spacing between slices from their positions as ITK's series reader computes it).

    The one check of a series, for ``read_header`` and ``read_volume`` alike: every file of the series is
    readable (GDCM silently leaves out a truncated one), the slices share size and orientation, and their
    positions are evenly spaced — no gap (missing slice), no two slices at one position — since ITK's reader
    would stack them anyway with an averaged spacing (and only a "Non uniform sampling" warning)."""
    folder = Path(folder)
    uid = _pick_series(folder, series_uid)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    _check_left_out(folder, {Path(f).name for f in files}, uid)
    slices = [_slice_reader(folder, f) for f in files]
    if len(slices) == 1:
        return files, header_of(slices[0])
    first = slices[0]
    for reader, name in zip(slices, files):
        if reader.GetSize() != first.GetSize():
            raise UserError(f"{folder}: slice {Path(name).name} is {_pixels(reader)} but {Path(files[0]).name} is "
                            f"{_pixels(first)} — a series must be one stack of equal slices; export it again")
        if not np.allclose(reader.GetDirection(), first.GetDirection(), atol=1e-3):
            raise UserError(f"{folder}: slices {Path(files[0]).name} and {Path(name).name} have different "
                            f"orientations ({_orientation(first)} vs {_orientation(reader)}) — a series must be one "
                            "stack of parallel slices; export each orientation as a series of its own")
        if not reader.HasMetaDataKey("0020|0032"):
            raise UserError(f"{folder}: slice {Path(name).name} has no position (Image Position Patient, 0020|0032) "
                            "— samadapt needs it to order the slices and measure their spacing")
    direction = np.asarray(first.GetDirection(), dtype=float).reshape(3, 3)
    normal = np.cross(direction[:, 0], direction[:, 1])
    origins = np.asarray([reader.GetOrigin() for reader in slices], dtype=float)
    order = np.argsort(origins @ normal, kind="stable")
    files, slices, origins = [files[i] for i in order], [slices[i] for i in order], origins[order]
    _check_positions(folder, origins @ normal, [Path(f).name for f in files])
    header = header_of(slices[0])
    header["size"] = list(slices[0].GetSize()[:2]) + [len(files)]
    header["spacing"][2] = float(np.linalg.norm(origins[-1] - origins[0]) / (len(files) - 1))  # as ITK does
    return files, header


def _check_positions(folder: Path, positions: np.ndarray, names: list[str]) -> None:
    """Sorted slice positions along the normal (mm) must be evenly spaced, without duplicates."""
    gaps = np.diff(positions)
    spacing = float(np.median(gaps))
    tolerance = max(1e-3, _SLICE_TOLERANCE * spacing)
    for i in np.flatnonzero(gaps <= tolerance):
        raise UserError(f"{folder}: two slices at {_mm(positions[i])} mm ({names[i]}, {names[i + 1]}) — remove the "
                        "duplicate, or split the series (several acquisitions or time points in one series?)")
    for i in np.flatnonzero(gaps > spacing + tolerance):
        raise UserError(f"{folder}: slice positions jump from {_mm(positions[i])} to {_mm(positions[i + 1])} mm "
                        f"(missing slice?) between {names[i]} and {names[i + 1]}; the others are {spacing:.3g} mm "
                        "apart — add the missing slice files or export the complete series")
    for i in np.flatnonzero(gaps < spacing - tolerance):
        raise UserError(f"{folder}: slices {names[i]} and {names[i + 1]} at {_mm(positions[i])} and "
                        f"{_mm(positions[i + 1])} mm are {gaps[i]:.3g} mm apart, the others {spacing:.3g} mm "
                        "(uneven spacing) — a series must have evenly spaced slices; export it again")


def _mm(value: float) -> str:
    return f"{value:.1f}" if abs(value * 10 - round(value * 10)) < 1e-3 else f"{value:.3f}"


def _pixels(reader: sitk.ImageFileReader) -> str:
    return "x".join(str(n) for n in reader.GetSize()) + " pixels"


def _orientation(reader: sitk.ImageFileReader) -> str:
    if reader.HasMetaDataKey("0020|0037"):
        return reader.GetMetaData("0020|0037").strip()
    return "none"


def _slice_reader(folder: Path, name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UserError(f"{folder}: slice {Path(name).name} cannot be read ({itk_reason(exc)}) — truncated or "
                        "corrupt? copy the file again") from None
    return reader


def _looks_like_dicom(path: Path) -> bool:
    if path.name.lower().endswith(_DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _check_left_out(folder: Path, listed: set[str], uid: str) -> None:
    """GDCM leaves out of a series every file it cannot parse (e.g. a truncated slice), leaving a silent gap:
    a DICOM-looking file of the folder that is in no series, or in this one but not listed, is an error."""
    for path in sorted(folder.iterdir()):
        if path.name in listed or path.name.upper() == "DICOMDIR" or not path.is_file() or not _looks_like_dicom(path):
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise UserError(f"{folder}: {path.name} looks like a DICOM slice but cannot be read (truncated or "
                            "corrupt?) — copy the file again, or move it out of the folder") from None
        if reader.HasMetaDataKey("0020|000e") and reader.GetMetaData("0020|000e").strip() == uid:
            raise UserError(f"{folder}: {path.name} belongs to series {uid} but GDCM leaves it out of the series "
                            "(corrupt?) — copy the file again, or move it out of the folder")


def _pick_series(folder: Path, series_uid: str | None) -> str:
    uids = dicom_series(folder)
    if not uids:
        _check_left_out(folder, set(), "")
        raise UserError(f"{folder}: no DICOM series found in this folder — point image= at a folder of .dcm files")
    if series_uid is None:
        if len(uids) > 1:
            raise UserError(f"{folder}: {len(uids)} DICOM series ({', '.join(uids)}) — choose one with series_uid")
        return uids[0]
    if series_uid not in uids:
        raise UserError(f"{folder}: no series {series_uid} (found {', '.join(uids)})")
    return series_uid


def read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    """Decode the series ``series_uid`` of ``folder`` (the only one when None), checked by ``dicom_series_files``."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, series_uid)[0])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{folder}: cannot read the DICOM series ({itk_reason(exc)})") from None
