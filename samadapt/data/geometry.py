"""From a stored volume to square model slices and exactly back.

Three invertible steps, each recorded in a JSON-able :class:`SliceMapping`:

1. **Canonical orientation (LPS)**: axes are permuted/flipped from the direction cosines so that array
   axes (z, y, x) increase towards Superior, Posterior, Left whatever voxel order the file used
   (what ``sitk.DICOMOrient(image, "LPS")`` does, kept as numpy index operations so it can be undone).
2. **Plane**: ``axial`` slices along z (rows anterior→posterior, columns patient right→left: the
   radiological view); ``coronal`` along y and ``sagittal`` along x, both with superior at the top.
3. **In-plane fit**: each slice (H x W pixels of sh x sw mm) is resized keeping its physical aspect
   ratio — the longest side fitted to ``image_size`` (``spacing=None``) or to ``spacing`` mm pixels —
   then centre padded (or cropped) to ``image_size`` squared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


def canonical_transform(direction: list[float] | tuple[float, ...]) -> tuple[list[int], list[bool]]:
    """``(source_axes, flips)`` taking a (z, y, x) array of an image with ``direction`` (SimpleITK's
    row-major 3x3, columns = world direction of index i, j, k in LPS) to canonical LPS order.

    Canonical array axis ``a`` comes from source array axis ``source_axes[a]``, reversed if
    ``flips[a]``. Oblique directions go to the nearest axes (greedy on the largest cosines)."""
    cosines = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))  # [world, index]
    signs = np.sign(np.asarray(direction, dtype=float).reshape(3, 3))
    index_of_world = [-1, -1, -1]
    for flat in np.argsort(-cosines, axis=None):
        world, index = divmod(int(flat), 3)
        if index_of_world[world] < 0 and index not in index_of_world:
            index_of_world[world] = index
    # array axis 0/1/2 is index axis k/j/i (2 - axis); canonical array axis a is world axis 2 - a.
    source_axes = [2 - index_of_world[2 - a] for a in range(3)]
    flips = [bool(signs[2 - a, index_of_world[2 - a]] < 0) for a in range(3)]
    return source_axes, flips


def to_canonical(array: np.ndarray, source_axes: list[int], flips: list[bool]) -> np.ndarray:
    """(z, y, x) array in stored voxel order → canonical LPS (a view, no copy)."""
    out = np.transpose(array, source_axes)
    return np.flip(out, [a for a in range(3) if flips[a]]) if any(flips) else out


def from_canonical(array: np.ndarray, source_axes: list[int], flips: list[bool]) -> np.ndarray:
    """Inverse of :func:`to_canonical`."""
    out = np.flip(array, [a for a in range(3) if flips[a]]) if any(flips) else array
    return np.transpose(out, np.argsort(source_axes))


def to_plane(volume: np.ndarray, plane: str) -> np.ndarray:
    """Canonical (z, y, x) volume → N x H x W stack of slices of ``plane`` (a view)."""
    stack = np.moveaxis(volume, PLANE_AXIS[plane], 0)
    return stack if plane == "axial" else stack[:, ::-1]  # superior at the top of the picture


def from_plane(stack: np.ndarray, plane: str) -> np.ndarray:
    """Inverse of :func:`to_plane`."""
    stack = stack if plane == "axial" else stack[:, ::-1]
    return np.moveaxis(stack, 0, PLANE_AXIS[plane])


def plane_spacing(spacing_zyx: tuple[float, float, float], plane: str) -> tuple[float, float]:
    """In-plane pixel size (rows, columns) in mm of ``plane`` for a canonical (z, y, x) spacing."""
    return tuple(s for a, s in enumerate(spacing_zyx) if a != PLANE_AXIS[plane])  # type: ignore[return-value]


@dataclass(frozen=True)
class InPlane:
    """Resize H x W → rh x rw (physical aspect kept), then place at ``offset`` (row, col) in an
    S x S canvas; a negative offset is a centre crop of the resized slice."""

    height: int
    width: int
    resized: tuple[int, int]
    offset: tuple[int, int]
    size: int

    @classmethod
    def fit(cls, shape: tuple[int, int], pixel_mm: tuple[float, float], size: int, spacing: float | None) -> "InPlane":
        extent = (shape[0] * pixel_mm[0], shape[1] * pixel_mm[1])  # mm
        target = spacing if spacing is not None else max(extent) / size
        resized = tuple(max(1, int(round(e / target))) for e in extent)
        offset = tuple((size - r) // 2 if r <= size else -((r - size) // 2) for r in resized)
        return cls(int(shape[0]), int(shape[1]), resized, offset, int(size))  # type: ignore[arg-type]

    def _windows(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(canvas window, resized window) holding the same pixels."""
        canvas, resized = [], []
        for r, off in zip(self.resized, self.offset):
            n = min(r, self.size)
            canvas.append(slice(max(off, 0), max(off, 0) + n))
            resized.append(slice(max(-off, 0), max(-off, 0) + n))
        return (canvas[0], canvas[1]), (resized[0], resized[1])

    def forward(self, slices: torch.Tensor, labels: bool = False) -> torch.Tensor:
        """N x H x W → N x S x S; images bilinear (anti-aliased), labels nearest; background 0."""
        x = slices[:, None].float()
        if labels:
            x = F.interpolate(x, size=self.resized, mode="nearest-exact")
        elif tuple(self.resized) != (self.height, self.width):
            x = F.interpolate(x, size=self.resized, mode="bilinear", align_corners=False, antialias=True)
        out = torch.zeros(x.shape[0], self.size, self.size, dtype=x.dtype)
        canvas, resized = self._windows()
        out[:, canvas[0], canvas[1]] = x[:, 0, resized[0], resized[1]]
        return out.to(slices.dtype) if labels else out

    def inverse(self, pred: torch.Tensor, argmax: bool = True) -> torch.Tensor:
        """N x S x S int labels, or N x C x S x S float scores (argmax after resizing) → N x H x W int64;
        scores with ``argmax=False`` → N x C x H x W float32 (outside the slice: 0).

        Nearest-exact resizing makes labels → :meth:`forward` → :meth:`inverse` the identity whenever the
        forward resize did not shrink the slice."""
        canvas, resized = self._windows()
        probabilities = pred.dim() == 4
        x = pred.float() if probabilities else pred[:, None].float()
        full = torch.zeros(x.shape[0], x.shape[1], *self.resized, dtype=torch.float32)
        full[:, :, resized[0], resized[1]] = x[:, :, canvas[0], canvas[1]]
        if probabilities:
            full = F.interpolate(full, size=(self.height, self.width), mode="bilinear", align_corners=False)
            return full.argmax(1) if argmax else full
        return F.interpolate(full, size=(self.height, self.width), mode="nearest-exact")[:, 0].round().long()


@dataclass(frozen=True)
class SliceMapping:
    """Everything needed to put slice predictions back on the original voxel grid (JSON-able)."""

    geometry: dict  # of the original volume, see readers.geometry_of
    source_axes: list[int]
    flips: list[bool]
    plane: str
    inplane: InPlane

    @property
    def num_slices(self) -> int:
        return int(self.geometry["size"][::-1][self.source_axes[PLANE_AXIS[self.plane]]])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SliceMapping":
        inplane = data["inplane"]
        return cls(data["geometry"], list(data["source_axes"]), list(data["flips"]), data["plane"],
                   InPlane(inplane["height"], inplane["width"], tuple(inplane["resized"]),
                           tuple(inplane["offset"]), inplane["size"]))

    def to_volume(self, pred: np.ndarray | torch.Tensor, chunk: int = 32) -> np.ndarray:
        """Slice predictions (N x S x S labels or N x C x S x S scores) → int64 (z, y, x) label volume in
        the original file's voxel order (``sitk.GetArrayFromImage`` order)."""
        pred = torch.as_tensor(pred)
        if pred.shape[0] != self.num_slices or pred.shape[-2:] != (self.inplane.size,) * 2:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match {self.num_slices} slices "
                             f"of {self.inplane.size} x {self.inplane.size}")
        stack = torch.cat([self.inplane.inverse(pred[i:i + chunk]) for i in range(0, pred.shape[0], chunk)])
        volume = from_canonical(from_plane(stack.numpy(), self.plane), self.source_axes, self.flips)
        return np.ascontiguousarray(volume)

    def to_probabilities(self, scores: np.ndarray | torch.Tensor, chunk: int = 8) -> np.ndarray:
        """N x C x S x S float scores → float32 C x z x y x x on the original voxel grid (for
        ``save_probabilities``)."""
        scores = torch.as_tensor(scores)
        stack = torch.cat([self.inplane.inverse(scores[i:i + chunk], argmax=False)
                           for i in range(0, scores.shape[0], chunk)]).numpy()
        return np.stack([np.ascontiguousarray(from_canonical(from_plane(stack[:, c], self.plane),
                                                             self.source_axes, self.flips))
                         for c in range(stack.shape[1])])
