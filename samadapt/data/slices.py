"""One volume as model-ready slices, and predictions back to the volume: :class:`VolumeSlices`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from samadapt.data import readers
from samadapt.data.geometry import InPlane, SliceMapping, canonical_transform, plane_spacing, to_canonical, to_plane
from samadapt.data.normalise import normalise
from samadapt.data.preprocessing import Preprocessing
from samadapt.errors import UserError


class VolumeSlices:
    """A volume normalised, reoriented to LPS and cut into N square slices along ``prep.plane``.

    ``images``: float32 N x S x S in [0, 1]; ``labels``: int64 N x S x S or None (S = image_size);
    ``reference``: the label checked against the image (shape, geometry, values) on the image's own
    voxel grid, int64 (z, y, x), or None — what predictions are scored against.
    Slices are computed on demand (``chunks``), so a large volume never needs N x S x S floats at once.
    ``to_volume`` / ``write`` undo everything onto the original voxel grid and geometry.
    """

    def __init__(self, image: str | os.PathLike, prep: Preprocessing, modality: str = "MR",
                 label: str | os.PathLike | None = None, num_classes: int | None = None,
                 series_uid: str | None = None):
        if prep.plane == "all":
            raise UserError("plane=all cuts three stacks — build one VolumeSlices per plane (axial, coronal, sagittal)")
        self.image_path, self.label_path, self.prep = Path(image), label and Path(label), prep
        self.modality, self.series_uid = modality, series_uid
        sitk_image = readers.read_volume(image, channel=prep.channel, series_uid=series_uid)
        volume = normalise(readers.to_array(sitk_image, image), modality, prep.window, prep.mr_foreground)
        self.geometry = readers.geometry_of(sitk_image)
        source_axes, flips = canonical_transform(self.geometry["direction"])
        self._stack = to_plane(to_canonical(volume, source_axes, flips), prep.plane)
        self._label_stack = self.reference = None
        if label is not None:
            self.reference = readers.read_label(label, sitk_image, image, prep.resample_labels, num_classes)
            self._label_stack = to_plane(to_canonical(self.reference, source_axes, flips), prep.plane)
        spacing_zyx = [self.geometry["spacing"][::-1][a] for a in source_axes]
        pixel_mm = plane_spacing(spacing_zyx, prep.plane)
        inplane = InPlane.fit(self._stack.shape[1:], pixel_mm, prep.image_size, prep.spacing)
        if min(inplane.offset) < 0:  # spacing= was chosen: a slice larger than the canvas loses its edges
            extent = " x ".join(f"{n * mm:.0f}" for n, mm in zip(self._stack.shape[1:], pixel_mm))
            print(f"warning: {image}: {prep.plane} slices span {extent} mm but spacing={prep.spacing:g} mm x "
                  f"image_size={prep.image_size} covers {prep.spacing * prep.image_size:.0f} mm — the edges are "
                  "cropped (predicted as background there); raise spacing or image_size", file=sys.stderr)
        self.mapping = SliceMapping(self.geometry, source_axes, flips, prep.plane, inplane)

    def __len__(self) -> int:
        return self._stack.shape[0]

    def image_slices(self, start: int, stop: int) -> np.ndarray:
        """float32 (stop - start) x S x S in [0, 1]."""
        chunk = torch.from_numpy(np.ascontiguousarray(self._stack[start:stop]))
        return self.mapping.inplane.forward(chunk).clamp_(0.0, 1.0).numpy()

    def label_slices(self, start: int, stop: int) -> np.ndarray | None:
        """int64 (stop - start) x S x S, or None without a label."""
        if self._label_stack is None:
            return None
        chunk = torch.from_numpy(np.ascontiguousarray(self._label_stack[start:stop]))
        return self.mapping.inplane.forward(chunk, labels=True).numpy()

    def canvas_labels(self, volume: np.ndarray) -> np.ndarray:
        """Any (z, y, x) label volume on the image's voxel grid (e.g. a user's box drawn as labels) → int64
        N x S x S slices, cut exactly like the reference label."""
        grid = tuple(self.geometry["size"][::-1])
        if volume.shape != grid:
            raise ValueError(f"label volume {volume.shape} is not on the image grid {grid}")
        source_axes, flips = self.mapping.source_axes, self.mapping.flips
        stack = torch.from_numpy(np.ascontiguousarray(to_plane(to_canonical(volume, source_axes, flips),
                                                               self.prep.plane)).astype(np.int64))
        return self.mapping.inplane.forward(stack, labels=True).numpy()

    def chunks(self, size: int = 32) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """``(start, images, labels)`` for consecutive blocks of at most ``size`` slices."""
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            yield start, self.image_slices(start, stop), self.label_slices(start, stop)

    @property
    def images(self) -> np.ndarray:
        return self.image_slices(0, len(self))

    @property
    def labels(self) -> np.ndarray | None:
        return self.label_slices(0, len(self))

    def to_volume(self, pred: np.ndarray | torch.Tensor) -> np.ndarray:
        """N x S x S int labels or N x C x S x S float scores → int64 (z, y, x) on the original voxel grid."""
        return self.mapping.to_volume(pred)

    def write(self, array: np.ndarray, out_path: str | os.PathLike) -> Path:
        """Write a (z, y, x) label volume (as uint8/uint16) with the input's exact geometry."""
        return write_labels(array, self.geometry, out_path)

    def save_probabilities(self, scores: np.ndarray | torch.Tensor, out_path: str | os.PathLike) -> Path:
        """N x C x S x S slice scores → a 4D float32 image (4th axis = class) with the input's geometry."""
        return save_probabilities(self.mapping.to_probabilities(scores), self.geometry, out_path)


def write_labels(array: np.ndarray, geometry: dict, out_path: str | os.PathLike) -> Path:
    """A (z, y, x) integer label volume → file with ``geometry`` (uint8, or uint16 above 255 classes)."""
    dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
    return readers.write_volume(np.asarray(array).astype(dtype), geometry, out_path)


def save_probabilities(probabilities: np.ndarray, geometry: dict, out_path: str | os.PathLike) -> Path:
    """C x z x y x x float probabilities on the original grid → a 4D float32 image (4th axis = class)
    whose first three axes have exactly ``geometry``."""
    return readers.write_volume(np.asarray(probabilities, dtype=np.float32), geometry, out_path)
