"""Read and write medical volumes with SimpleITK: NIfTI, NRRD, MHA/MHD files and DICOM series folders.

Everything is read as a 3D ``sitk.Image`` (LPS world coordinates, SimpleITK's own convention); arrays
taken from it are (z, y, x). CT rescale slope/intercept (DICOM tags, NIfTI ``scl_slope``/``scl_inter``)
are applied by SimpleITK while reading, so CT voxels arrive in HU. Every problem a user can fix is a
one-line :class:`UserError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samadapt.data.formats import WRITABLE_SUFFIXES
from samadapt.errors import UserError, one_line
from samadapt.io import atomic_path

GEOMETRY_TOLERANCE_MM = 1e-3
# Writers that keep everything in one file, so a temp-name-then-rename write is atomic.
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
        if path.name.endswith((".nii", ".nii.gz")):
            _check_nifti(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise UserError(f"{path}: cannot read the image — corrupt or not a NIfTI/NRRD/MHA/DICOM file "
                            f"({_itk_reason(exc)})") from None
    _decodes += 1
    return _as_3d(image, path, channel)


def _check_nifti(path: Path) -> None:
    """What ITK 5's NIfTI reader does not check: a truncated file (it pads with zeros) and NaN/Inf voxels
    (it silently replaces them with 0, fixed only in ITK 6: InsightSoftwareConsortium/ITK#6683)."""
    try:
        raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read the image — corrupt or truncated .nii.gz ({one_line(exc)})") from None
    layout = None
    for endian in "<>":
        if len(raw) >= 4 and struct.unpack(endian + "i", raw[:4])[0] in (348, 540):
            layout = endian
            break
    if layout is None:
        raise UserError(f"{path}: cannot read the image — not a NIfTI file (bad header size)")
    if struct.unpack(layout + "i", raw[:4])[0] == 348:
        dims = struct.unpack(layout + "8h", raw[40:56])
        datatype = struct.unpack(layout + "h", raw[70:72])[0]
        offset = int(struct.unpack(layout + "f", raw[108:112])[0])
    else:
        datatype = struct.unpack(layout + "h", raw[12:14])[0]
        dims = struct.unpack(layout + "8q", raw[16:80])
        offset = struct.unpack(layout + "q", raw[168:176])[0]
    dtype = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
             1280: "u8", 2304: "u1"}.get(datatype)
    shape = tuple(int(d) for d in dims[1:1 + max(1, min(int(dims[0]), 7))])
    if dtype is None:  # complex / RGB / float128: leave the checks to ITK
        return
    count = int(np.prod(shape)) * (3 if datatype == 2304 else 1)
    if len(raw) < offset + count * np.dtype(dtype).itemsize:
        raise UserError(f"{path}: cannot read the image — truncated file ({len(raw)} bytes, header promises "
                        f"{offset + count * np.dtype(dtype).itemsize})")
    if dtype.startswith("f"):
        values = np.frombuffer(raw, layout + dtype, count=count, offset=offset)
        if not np.isfinite(values).all():
            x, y, z = (shape + (1, 1))[:3]
            _raise_non_finite(values.reshape(-1, z, y, x), path)  # file order: x fastest


def _raise_non_finite(array: np.ndarray, path: str | os.PathLike) -> None:
    """``array``: (..., z, y, x); raise naming the count and the slices that are entirely NaN/Inf."""
    finite = np.isfinite(array)
    bad_slices = np.flatnonzero(~finite.reshape(-1, *array.shape[-3:]).any(axis=(0, 2, 3)))
    where = f"; slices z={_ranges(bad_slices)} are entirely NaN/Inf" if bad_slices.size else ""
    raise UserError(f"{path}: {int((~finite).sum())} NaN/Inf voxels{where} — fix or crop the volume")


def read_header(path: str | os.PathLike, series_uid: str | None = None) -> dict:
    """Geometry and pixel type without decoding the pixels (DICOM: of the series' files)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    if path.is_dir():
        files = _series_files(path, series_uid)
        reader.SetFileName(files[0])
        slices = len(files)
    else:
        reader.SetFileName(str(path))
        slices = None
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot read the header ({_itk_reason(exc)})") from None
    size = list(reader.GetSize())
    if slices is not None:
        size = size[:2] + [slices]
    return {"size": size, "spacing": list(reader.GetSpacing()), "origin": list(reader.GetOrigin()),
            "direction": list(reader.GetDirection()), "components": reader.GetNumberOfComponents(),
            "pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID()), "dimension": reader.GetDimension()}


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """Series instance UIDs of the DICOM files directly inside ``folder`` (may be empty)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _series_files(folder: Path, series_uid: str | None) -> list[str]:
    uids = dicom_series(folder)
    if not uids:
        raise UserError(f"{folder}: no DICOM series found in this folder — point image= at a folder of .dcm files")
    if series_uid is None:
        if len(uids) > 1:
            raise UserError(f"{folder}: {len(uids)} DICOM series ({', '.join(uids)}) — choose one with series_uid")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise UserError(f"{folder}: no series {series_uid} (found {', '.join(uids)})")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_series_files(folder, series_uid))
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
