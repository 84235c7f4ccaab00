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

from samadapt.data.dicom import dicom_series_files, read_dicom_series
from samadapt.data.formats import WRITABLE_SUFFIXES
from samadapt.data.itk import header_of, itk_reason
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
        image = read_dicom_series(path, series_uid)
    else:
        if _is_nifti(path):
            check_nifti(path, decode=True)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise UserError(f"{path}: cannot read the image — corrupt or not a NIfTI/NRRD/MHA/DICOM file "
                            f"({itk_reason(exc)})") from None
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
        raise UserError(f"{path}: cannot read the header ({itk_reason(exc)})") from None
    if _is_nifti(path):
        check_nifti(path, decode=False)
    return header_of(reader)


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
