"""OME-TIFF's physical pixel size (OME-XML `Pixels` `PhysicalSizeX/Y`), which OpenSlide ignores."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import tifffile

# OME units of length → µm (the OME default unit is µm).
_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4, "pm": 1e-6}


def ome_pixel_size_from_xml(xml: str) -> tuple[float, float] | None:
    """(PhysicalSizeX, PhysicalSizeY) of the first image in µm/px, or None when absent or unusable."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        sizes = []
        for axis in ("X", "Y"):
            value = element.get(f"PhysicalSize{axis}")
            factor = _TO_UM.get(element.get(f"PhysicalSize{axis}Unit", "µm"))
            try:
                number = float(value) * factor if value is not None and factor is not None else float("nan")
            except ValueError:
                number = float("nan")
            sizes.append(number)
        if all(s > 0 for s in sizes):  # NaN compares False
            return sizes[0], sizes[1]
        return None
    return None


def ome_physical_size(path: str | Path) -> tuple[float, float] | None:
    """The OME pixel size of a TIFF file in µm/px, or None (not OME, no size, not a TIFF)."""
    try:
        with tifffile.TiffFile(path) as tiff:
            xml = tiff.ome_metadata if tiff.is_ome else None
    except Exception:  # noqa: BLE001 — a file tifffile cannot parse simply has no OME size
        return None
    return ome_pixel_size_from_xml(xml) if xml else None
