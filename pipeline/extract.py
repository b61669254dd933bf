"""Region extraction: large block reads from one pyramid level, area-resized to R×R.

Regions come out in the grid's (row-major) order. Reads cover a band of grid rows
and a run of neighbouring regions at a time (at most about `block_px` level pixels
on a side), never one `read_region` per region unless the regions are far apart.

Resizing a footprint of f·R level pixels to R:
- f within 1 % of 1 (an exact level): the R×R pixels at the rounded footprint origin;
- f an integer k and the footprint on whole pixels: the exact k×k block mean, rounded half up;
- otherwise: PIL's BOX filter over the float footprint box (an area average whose
  edge pixels count whole or not at all, with 8-bit rounding between its two passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image

from pipeline.grid import LEVEL_TOLERANCE, RegionGrid
from pipeline.slide import read_rgb

INTEGER_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class _Footprint:
    """One region's footprint in level pixels: float box [x0, x1) × [y0, y1)."""

    x0: float
    y0: float
    x1: float
    y1: float


def block_mean_uint8(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Exact k×k block mean, rounded half up: (h·k, w·k, 3) uint8 → (h, w, 3) uint8."""
    h, w = pixels.shape[0] // factor, pixels.shape[1] // factor
    blocks = pixels[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    total = blocks.sum(axis=(1, 3), dtype=np.uint32)
    count = factor * factor
    return ((total + count // 2) // count).astype(np.uint8)


def _is_integer(value: float) -> bool:
    return abs(value - round(value)) <= INTEGER_TOLERANCE


def resize_footprint(block: np.ndarray, box: _Footprint, region_size: int, exact_level: bool) -> np.ndarray:
    """Cut one footprint (box in the block's pixel coordinates) out of `block` and resize it to R×R.

    block: (h, w, 3) uint8 → (R, R, 3) uint8. See the module docstring for the three cases.
    """
    size = region_size
    if exact_level:
        x, y = round(box.x0), round(box.y0)
        return np.ascontiguousarray(block[y : y + size, x : x + size])
    factor = (box.x1 - box.x0) / size
    if _is_integer(factor) and _is_integer(box.x0) and _is_integer(box.y0):
        k, x, y = round(factor), round(box.x0), round(box.y0)
        return block_mean_uint8(block[y : y + k * size, x : x + k * size], k)
    # Hand PIL only the footprint's pixels: converting the whole block per region would copy it each time.
    x, y = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
    cut = np.ascontiguousarray(block[y : math.ceil(box.y1), x : math.ceil(box.x1)])
    image = Image.fromarray(cut)
    inner = (max(box.x0 - x, 0.0), max(box.y0 - y, 0.0), min(box.x1 - x, cut.shape[1]), min(box.y1 - y, cut.shape[0]))
    resized = image.resize((size, size), Image.Resampling.BOX, box=inner)
    return np.asarray(resized)


def _row_runs(cols: np.ndarray, per_region: float, block_px: int, max_gap: int) -> list[tuple[int, int]]:
    """Split one band's regions (sorted by col) into runs read together: [(start, stop)] indices.

    A run breaks where `max_gap` or more empty columns separate two regions, or where it
    would exceed `block_px` level pixels in width.
    """
    runs = []
    start = 0
    for i in range(1, len(cols) + 1):
        if i == len(cols) or cols[i] - cols[i - 1] > max_gap + 1 or (cols[i] - cols[start] + 1) * per_region > block_px:
            runs.append((start, i))
            start = i
    return runs


def iter_regions(
    slide: openslide.OpenSlide,
    grid: RegionGrid,
    level: int,
    region_size: int,
    *,
    resize_factor: float | None = None,
    block_px: int = 4096,
    max_band_regions: int = 512,
    max_gap: int = 2,
) -> Iterator[np.ndarray]:
    """Yield each region of `grid` as (R, R, 3) uint8 RGB (on white), in the grid's order.

    level: the pyramid level to read (see `pipeline.grid.choose_level`); resize_factor:
    its factor, where 1.0 means the level is exact (no resize); None derives it from
    grid.step and the level's downsample. block_px bounds a read's side in level px;
    max_band_regions bounds how many finished regions a band holds before yielding them
    (memory ≈ max_band_regions · R² · 3 bytes, 77 MB at the defaults, plus one block of
    block_px² · 7 bytes while it is read).
    """
    if len(grid) == 0:
        return
    downsample = slide.level_downsamples[level]
    span = grid.step / downsample  # footprint side in level px
    if resize_factor is None:
        exact_level = abs(span - region_size) <= LEVEL_TOLERANCE * region_size
    else:
        exact_level = resize_factor == 1.0
    footprint_px = max(span, float(region_size)) if exact_level else span
    rows = grid.coords[:, 0]
    cols = grid.coords[:, 1]
    row_values, row_starts = np.unique(rows, return_index=True)
    row_bounds = list(zip(row_starts, list(row_starts[1:]) + [len(rows)]))
    rows_per_band = max(1, int(block_px // math.ceil(footprint_px + 1)))
    band_start = 0
    while band_start < len(row_bounds):
        # A band: consecutive grid rows, at most rows_per_band of them and max_band_regions regions.
        band_stop = band_start + 1
        while (
            band_stop < len(row_bounds)
            and band_stop - band_start < rows_per_band
            and row_values[band_stop] - row_values[band_start] < rows_per_band
            and row_bounds[band_stop][1] - row_bounds[band_start][0] <= max_band_regions
        ):
            band_stop += 1
        first, last = row_bounds[band_start][0], row_bounds[band_stop - 1][1]
        yield from _extract_band(slide, grid, level, region_size, first, last, downsample, span, exact_level, block_px, max_gap)
        band_start = band_stop


def _extract_band(
    slide: openslide.OpenSlide,
    grid: RegionGrid,
    level: int,
    region_size: int,
    first: int,
    last: int,
    downsample: float,
    span: float,
    exact_level: bool,
    block_px: int,
    max_gap: int,
) -> Iterator[np.ndarray]:
    """Regions first..last-1 (whole grid rows), read run by run across the band, yielded in order."""
    index = np.arange(first, last)
    cols = grid.coords[index, 1]
    by_col = index[np.argsort(cols, kind="stable")]
    out: dict[int, np.ndarray] = {}
    fx = grid.origin[:, 0] / downsample
    fy = grid.origin[:, 1] / downsample
    reach = max(span, float(region_size)) if exact_level else span
    for start, stop in _row_runs(grid.coords[by_col, 1], reach, block_px, max_gap):
        members = by_col[start:stop]
        xa = math.floor(fx[members].min() + INTEGER_TOLERANCE)
        ya = math.floor(fy[members].min() + INTEGER_TOLERANCE)
        xb = math.ceil(fx[members].max() + reach - INTEGER_TOLERANCE)
        yb = math.ceil(fy[members].max() + reach - INTEGER_TOLERANCE)
        if exact_level:
            xb = max(xb, int(np.round(fx[members]).max()) + region_size)
            yb = max(yb, int(np.round(fy[members]).max()) + region_size)
        block = read_rgb(slide, (round(xa * downsample), round(ya * downsample)), level, (xb - xa, yb - ya))
        for i in members:
            box = _Footprint(x0=fx[i] - xa, y0=fy[i] - ya, x1=fx[i] - xa + span, y1=fy[i] - ya + span)
            out[int(i)] = resize_footprint(block, box, region_size, exact_level)
    for i in range(first, last):
        yield out.pop(i)
