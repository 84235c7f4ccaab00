"""What every SimpleITK reader here shares: a header as a dict, and the informative part of ITK's errors."""

from __future__ import annotations

import SimpleITK as sitk

from samadapt.errors import one_line


def header_of(reader: sitk.ImageFileReader) -> dict:
    """Geometry and pixel type of a reader that has read the image information (not the pixels)."""
    return {"size": list(reader.GetSize()), "spacing": list(reader.GetSpacing()), "origin": list(reader.GetOrigin()),
            "direction": list(reader.GetDirection()), "components": reader.GetNumberOfComponents(),
            "pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID()), "dimension": reader.GetDimension()}


def itk_reason(exc: RuntimeError) -> str:
    """The informative part of an ITK exception (its last non-empty line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return one_line(lines[-1] if lines else str(exc))[:300]
