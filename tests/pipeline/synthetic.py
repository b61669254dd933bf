"""Synthetic pyramidal tiled TIFFs with known tissue layouts, for exact pipeline tests.

OpenSlide opens them as `generic-tiff`: level 0 plus one reduced image per extra
downsample, all tiled; the resolution tags (centimetres) give `openslide.mpp-x/y`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

WHITE = (255, 255, 255)


def synthetic_image(
    *,
    width: int,
    height: int,
    tissue_rects: Sequence[tuple[int, int, int, int]],
    colour: tuple[int, int, int] = (180, 80, 160),
    textured: bool = True,
) -> np.ndarray:
    """Level-0 picture: white background, tissue rectangles `(x, y, w, h)` in level-0 px.

    With `textured`, tissue pixels vary deterministically around `colour` (±24 per
    channel), so block means are non-trivial. Returns `(height, width, 3) uint8`.
    """
    image = np.full((height, width, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    texture = ((xx * 7 + yy * 13) % 49 - 24) if textured else np.zeros_like(xx)
    for x, y, w, h in tissue_rects:
        ys, xs = slice(max(y, 0), min(y + h, height)), slice(max(x, 0), min(x + w, width))
        for c in range(3):
            sign = 1 if c != 1 else -1
            image[ys, xs, c] = np.clip(colour[c] + sign * texture[ys, xs], 0, 255)
    return image


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Exact integer block mean (rounded half up) of `(h, w, 3) uint8` over `factor`×`factor` blocks.

    Trailing rows/columns that do not fill a block are dropped.
    """
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1).astype(np.float64)
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float,
    levels: Sequence[int] = (1, 2, 4),
    tissue_rects: Sequence[tuple[int, int, int, int]] = (),
    tile: int = 256,
    colour: tuple[int, int, int] = (180, 80, 160),
    with_mpp: bool = True,
    compression: str | None = None,
    textured: bool = True,
) -> np.ndarray:
    """Write a pyramidal tiled TIFF that OpenSlide opens; return its level-0 `(height, width, 3) uint8`.

    levels: integer downsamples, the first must be 1; level k holds `block_mean(level0, levels[k])`.
    mpp: level-0 µm/px, written as resolution tags unless `with_mpp` is False.
    compression: None (raw, pixels exact), "jpeg" or "zlib".
    """
    if not levels or levels[0] != 1:
        raise ValueError(f"levels must start with downsample 1, got {tuple(levels)}")
    image = synthetic_image(width=width, height=height, tissue_rects=tissue_rects, colour=colour, textured=textured)
    with tifffile.TiffWriter(path) as tiff:
        for index, factor in enumerate(levels):
            level = image if factor == 1 else block_mean(image, factor)
            options: dict = {}
            if with_mpp:
                px_per_cm = 1e4 / (mpp * factor)
                options = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            else:
                options = {"resolution": (1, 1), "resolutionunit": "NONE"}
            tiff.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if index == 0 else 1,
                metadata=None,
                **options,
            )
    return image


def write_ome_pyramid(
    path: str | Path,
    image: np.ndarray,
    *,
    mpp: float,
    downsamples: Sequence[int] = (1, 2, 4),
    tile: int = 256,
    compression: str | None = "jpeg",
) -> list[np.ndarray]:
    """An OME-TIFF pyramid as QuPath/bioformats write it: level 0 in the main IFD, the reduced
    levels in its SubIFDs, `PhysicalSizeX/Y` = mpp in the OME-XML and no resolution tags.

    image: (h, w, 3) uint8 level 0; returns the levels written (block means of `image`).
    """
    levels = [image if d == 1 else block_mean(image, d) for d in downsamples]
    options = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path, ome=True) as tiff:
        tiff.write(levels[0], subifds=len(levels) - 1,
                   metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **options)
        for level in levels[1:]:
            tiff.write(level, subfiletype=1, **options)
    return levels


def write_stripped_tiff(
    path: str | Path, image: np.ndarray, *, mpp: float, rows_per_strip: int = 16, compression: str | None = None
) -> None:
    """An untiled (stripped) RGB TIFF with resolution tags, which OpenSlide refuses."""
    px_per_cm = 1e4 / mpp
    tifffile.imwrite(
        path, image, photometric="rgb", rowsperstrip=rows_per_strip, compression=compression,
        resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", metadata=None,
    )
