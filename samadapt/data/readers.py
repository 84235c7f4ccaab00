"""Read and write medical volumes with SimpleITK: NIfTI, NRRD, MHA/MHD files and DICOM series folders.

Everything is read as a 3D ``sitk.Image`` (LPS world coordinates, SimpleITK's own convention); arrays
taken from it are (z, y, x). CT rescale slope/intercept (DICOM tags, NIfTI ``scl_slope``/``scl_inter``)
are applied by SimpleITK while reading, so CT voxels arrive in HU. Every problem a user can fix is a
one-line :class:`UserError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samadapt.data.formats import WRITABLE_SUFFIXES
from samadapt.errors import UserError, one_line
from samadapt.io import atomic_path

GEOMETRY_TOLERANCE_MM = 1e-3
_decodes = 0


def decode_count() -> int:
    """How many volumes this process has decoded (pixel data read); the slice-cache tests count them."""
    return _decodes


def read_volume(path: str | os.PathLike, channel: int | None = None, series_uid: str | None = None) -> sitk.Image:
    """Decode a 3D volume (file or DICOM series folder).

    ``channel`` picks one volume of a 4D / multi-component image (required for those); ``series_uid``
    picks one series of a DICOM folder holding several. A 2D image becomes a one-slice volume.
    """
    global _decodes
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
    else:
        if _is_nifti(path):
            check_nifti(path, decode=True)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise UserError(f"{path}: cannot read the image — corrupt or not a NIfTI/NRRD/MHA/DICOM file "
                            f"({_itk_reason(exc)})") from None
    _decodes += 1
    return _as_3d(image, path, channel)


# --- NIfTI: what ITK 5's reader does not check --------------------------------------------------------

_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                 1280: "u8", 2304: "u1"}
_FIX_SCALING = "fix the header's scaling (nibabel: img.header.set_slope_inter(1, 0), or re-export the image)"


@dataclass(frozen=True)
class _NiftiHeader:
    layout: str  # byte order, "<" or ">"
    shape: tuple[int, ...]  # x, y, z, ... voxels
    datatype: int
    offset: int  # of the voxels in the (uncompressed) file
    slope: float  # scl_slope and scl_inter as the reader applies them (1 and 0: no scaling)
    inter: float

    @property
    def dtype(self) -> str | None:
        return _NIFTI_DTYPES.get(self.datatype)  # None: complex / float128, left to ITK

    @property
    def count(self) -> int:
        return int(np.prod(self.shape)) * (3 if self.datatype == 2304 else 1)  # 2304: RGB


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def check_nifti(path: str | os.PathLike, decode: bool = True) -> None:
    """The one NIfTI check of ``read_header`` (``decode=False``: the header, plus the voxels' range only when
    the scaling could overflow) and of ``read_volume`` (``decode=True``: also a truncated file — ITK 5 pads it
    with zeros — and NaN/Inf voxels, which it silently replaces with 0, fixed only in ITK 6:
    InsightSoftwareConsortium/ITK#6683).

    Header rules: dim[0] in 1..7 and every used dim >= 1 (ITK reads a 0 as 1, so a mask would get another
    shape); scl_slope/scl_inter finite (ITK ignores an infinite one); the scaled voxels finite in the type the
    reader returns (float32, float64 for float64 files)."""
    path = Path(path)
    raw = _nifti_bytes(path, None if decode else 540)
    header = _nifti_header(raw, path)
    dtype = header.dtype
    if dtype is None:
        return
    if decode:
        size = header.offset + header.count * np.dtype(dtype).itemsize
        if len(raw) < size:
            raise UserError(f"{path}: cannot read the image — truncated file ({len(raw)} bytes, header promises "
                            f"{size})")
        if dtype.startswith("f"):
            values = _nifti_voxels(raw, header)
            if not np.isfinite(values).all():
                x, y, z = (header.shape + (1, 1))[:3]
                _raise_non_finite(values.reshape(-1, z, y, x), path)  # file order: x fastest
    _check_nifti_scaling(header, path, lambda: _nifti_voxels(raw if decode else _nifti_bytes(path), header))


def _nifti_bytes(path: Path, limit: int | None = None) -> bytes:
    """The file's bytes, gunzipped if it is gzip-compressed; only the first ``limit`` if given."""
    try:
        with open(path, "rb") as handle:
            compressed = handle.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            return handle.read() if limit is None else handle.read(limit)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read the image — corrupt or truncated .nii.gz ({one_line(exc)})") from None


def _nifti_header(raw: bytes, path: Path) -> _NiftiHeader:
    """Parse a NIfTI-1/2 header and refuse what would make the readers disagree (see ``check_nifti``)."""
    layout = next((e for e in "<>" if len(raw) >= 4 and struct.unpack(e + "i", raw[:4])[0] in (348, 540)), None)
    if layout is None:
        raise UserError(f"{path}: cannot read the image — not a NIfTI file (bad header size)")
    version = struct.unpack(layout + "i", raw[:4])[0]
    if len(raw) < version:
        raise UserError(f"{path}: cannot read the image — truncated NIfTI header ({len(raw)} of {version} bytes)")
    if version == 348:
        dims = struct.unpack(layout + "8h", raw[40:56])
        datatype = struct.unpack(layout + "h", raw[70:72])[0]
        offset, slope, inter = struct.unpack(layout + "3f", raw[108:120])
    else:
        datatype = struct.unpack(layout + "h", raw[12:14])[0]
        dims = struct.unpack(layout + "8q", raw[16:80])
        offset, slope, inter = struct.unpack(layout + "q2d", raw[168:192])
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise UserError(f"{path}: corrupt NIfTI header — dim[0]={ndim} dimensions (must be 1..7); re-export the image")
    shape = tuple(int(d) for d in dims[1:1 + ndim])
    if min(shape) < 1:
        raise UserError(f"{path}: corrupt NIfTI header — dims {shape} include {min(shape)} (every axis needs at "
                        "least 1 voxel; ITK would read it as 1 and change the shape); re-export the image")
    for name, value in (("scl_slope", slope), ("scl_inter", inter)):
        if math.isinf(value):
            raise UserError(f"{path}: NIfTI {name}={value} is not finite — {_FIX_SCALING}")
    # What ITK applies: a 0 or NaN slope (NaN = "unset", as nibabel writes) counts as 1, a NaN intercept as 0.
    slope = 1.0 if math.isnan(slope) or slope == 0 else float(slope)
    inter = 0.0 if math.isnan(inter) else float(inter)
    return _NiftiHeader(layout, shape, int(datatype), int(offset), slope, inter)


def _nifti_voxels(raw: bytes, header: _NiftiHeader) -> np.ndarray:
    """The stored voxel values (flat, file order; as many as ``raw`` holds, up to the header's count)."""
    dtype = np.dtype(header.layout + header.dtype)
    count = max(0, min(header.count, (len(raw) - header.offset) // dtype.itemsize))
    return np.frombuffer(raw, dtype, count=count, offset=min(header.offset, len(raw)))


def _check_nifti_scaling(header: _NiftiHeader, path: Path, voxels) -> None:
    """Refuse an ``scl_slope``/``scl_inter`` that turns voxels into ±Inf in the reader's output type; the voxels
    are read (``voxels()``) only when the stored type's whole range would not fit."""
    if (header.slope, header.inter) == (1.0, 0.0):
        return
    out = np.float64 if header.dtype == "f8" else np.float32  # what ITK returns for a scaled NIfTI
    limit = float(np.finfo(out).max)
    info = np.finfo(header.dtype) if header.dtype.startswith("f") else np.iinfo(header.dtype)
    if all(abs(header.slope * float(bound) + header.inter) <= limit for bound in (info.min, info.max)):
        return
    values = voxels()
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if not values.size:
        return
    low, high = float(values.min()), float(values.max())
    scaled = sorted((header.slope * low + header.inter, header.slope * high + header.inter))
    if max(abs(scaled[0]), abs(scaled[1])) > limit:
        raise UserError(f"{path}: NIfTI scl_slope={header.slope:g}, scl_inter={header.inter:g} scale the voxel "
                        f"values {low:g}..{high:g} to {scaled[0]:.3g}..{scaled[1]:.3g}, beyond "
                        f"{np.dtype(out).name} (they would read as Inf) — {_FIX_SCALING}")


def _raise_non_finite(array: np.ndarray, path: str | os.PathLike) -> None:
    """``array``: (..., z, y, x); raise naming the count and the slices that are entirely NaN/Inf."""
    finite = np.isfinite(array)
    bad_slices = np.flatnonzero(~finite.reshape(-1, *array.shape[-3:]).any(axis=(0, 2, 3)))
    where = f"; slices z={_ranges(bad_slices)} are entirely NaN/Inf" if bad_slices.size else ""
    raise UserError(f"{path}: {int((~finite).sum())} NaN/Inf voxels{where} — fix or crop the volume")


def read_header(path: str | os.PathLike, series_uid: str | None = None) -> dict:
    """Geometry and pixel type without decoding the pixels, checked by the same rules as ``read_volume``
    (NIfTI: ``check_nifti``; DICOM: the series' own slice positions, see ``dicom_series_files``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        return dicom_series_files(path, series_uid)[1]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot read the header ({_itk_reason(exc)})") from None
    if _is_nifti(path):
        check_nifti(path, decode=False)
    return _header_of(reader)


def _header_of(reader: sitk.ImageFileReader) -> dict:
    return {"size": list(reader.GetSize()), "spacing": list(reader.GetSpacing()), "origin": list(reader.GetOrigin()),
            "direction": list(reader.GetDirection()), "components": reader.GetNumberOfComponents(),
            "pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID()), "dimension": reader.GetDimension()}


# --- DICOM series -------------------------------------------------------------------------------------

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
        return files, _header_of(slices[0])
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
    header = _header_of(slices[0])
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
        raise UserError(f"{folder}: slice {Path(name).name} cannot be read ({_itk_reason(exc)}) — truncated or "
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


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, series_uid)[0])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{folder}: cannot read the DICOM series ({_itk_reason(exc)})") from None


def _as_3d(image: sitk.Image, path: Path, channel: int | None) -> sitk.Image:
    components = image.GetNumberOfComponentsPerPixel()
    volumes = image.GetSize()[3] if image.GetDimension() == 4 else components
    if volumes > 1 and channel is None:
        raise UserError(f"{path}: 4D image with {volumes} volumes — set channel=0..{volumes - 1}")
    if channel is not None and not 0 <= channel < max(volumes, 1):
        raise UserError(f"{path}: channel={channel} but the image has {volumes} volume(s) — use 0..{volumes - 1}")
    if components > 1:
        image = sitk.VectorIndexSelectionCast(image, channel)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, channel or 0])
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
    if image.GetDimension() != 3:
        raise UserError(f"{path}: {image.GetDimension()}D image — expected a 3D volume")
    return image


def _itk_reason(exc: RuntimeError) -> str:
    """The informative part of an ITK exception (its last non-empty line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return one_line(lines[-1] if lines else str(exc))[:300]


def to_array(image: sitk.Image, path: str | os.PathLike) -> np.ndarray:
    """Pixels as float32 (z, y, x); NaN/Inf voxels are an error naming the file and the slices."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        _raise_non_finite(array, path)
    return array


def _ranges(indices: np.ndarray) -> str:
    shown = ",".join(str(int(i)) for i in indices[:8])
    return shown + (f",... ({indices.size} slices)" if indices.size > 8 else "")


def label_grid_error(label: dict, image: dict, label_path: str | os.PathLike,
                     image_path: str | os.PathLike) -> UserError | None:
    """The error to raise when a label's voxel grid is not its image's (``geometry_of`` / ``read_header``
    dicts: same size, spacing/origin in mm and direction cosines within GEOMETRY_TOLERANCE_MM), else None."""
    if list(label["size"]) != list(image["size"]):
        problem = f"shape {tuple(label['size'])} differs from image {image_path} {tuple(image['size'])} (x, y, z)"
    elif not all(np.allclose(label[k], image[k], rtol=0, atol=GEOMETRY_TOLERANCE_MM)
                 for k in ("spacing", "origin", "direction")):
        problem = f"geometry (spacing/origin/direction) differs from image {image_path} by more than 1e-3 mm"
    else:
        return None
    return UserError(f"{label_path}: label {problem} — fix the files or set resample_labels=true")


def read_label(path: str | os.PathLike, image: sitk.Image, image_path: str | os.PathLike,
               resample: bool = False, num_classes: int | None = None) -> np.ndarray:
    """Decode a label map on ``image``'s voxel grid as int64 (z, y, x), checking shape, geometry, values.

    ``resample=True`` resamples a label with other geometry onto the image grid (nearest neighbour)
    instead of refusing it."""
    label = read_volume(path)
    error = label_grid_error(geometry_of(label), geometry_of(image), path, image_path)
    if error is not None:
        if not resample:
            raise error
        label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    values = to_array(label, path)
    check_label_values(values, path, num_classes)
    return values.astype(np.int64)


def check_label_values(values: np.ndarray, path: str | os.PathLike, num_classes: int | None) -> None:
    """Labels must be integers in ``[0, num_classes)``; otherwise a UserError with the values and the fix."""
    if not np.array_equal(values, np.round(values)):
        odd = np.unique(values[values != np.round(values)])[:5]
        raise UserError(f"{path}: label map has non-integer values (e.g. {', '.join(f'{v:g}' for v in odd)}) "
                        "— labels must be integer class ids (0 = background)")
    found = np.unique(values).astype(np.int64)
    shown = "{" + ",".join(str(v) for v in found[:12]) + (",..." if found.size > 12 else "") + "}"
    if found.size and found[0] < 0:
        raise UserError(f"{path}: label values {shown} include negatives — labels must be 0 (background) or above")
    if num_classes is not None and found.size and found[-1] >= num_classes:
        raise UserError(f"{path}: values {shown} but num_classes={num_classes} — "
                        f"set num_classes={int(found[-1]) + 1} or remap labels")


def write_volume(array: np.ndarray, geometry: dict, out_path: str | os.PathLike) -> Path:
    """Write a (z, y, x) array — or C x z x y x x (e.g. class probabilities) as a 4D image — with
    exactly ``geometry`` (``size`` x, y, z, ``spacing``, ``origin``, ``direction``), atomically."""
    out_path = Path(out_path)
    if not str(out_path).endswith(WRITABLE_SUFFIXES):
        raise UserError(f"{out_path}: unsupported output format — use one of {', '.join(WRITABLE_SUFFIXES)}")
    size = tuple(geometry["size"])
    if array.shape[-3:] != size[::-1]:
        raise ValueError(f"array shape {array.shape} does not match the volume's (z, y, x) {size[::-1]}")
    volumes = [array] if array.ndim == 3 else list(array)
    images = []
    for volume in volumes:
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
        images.append(image)
    image = images[0] if array.ndim == 3 else sitk.JoinSeries(images)
    with atomic_path(out_path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return out_path


def geometry_of(image: sitk.Image) -> dict:
    """JSON-able geometry: size (x, y, z voxels), spacing (x, y, z mm), origin (mm, LPS), direction."""
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}
