"""Region extraction: large block reads from one pyramid level, area-resized to R×R.

Regions come out in the grid's (row-major) order. Each read covers one grid row's run
of neighbouring regions (up to `block_px` level pixels wide), never one read per region
unless the regions are far apart. Reading only the regions' own rows decodes less than
square blocks around irregular tissue; the reader's tile cache is widened so that tiles
shared by two grid rows are decoded once. Any `pipeline.readers` backend reads the blocks.
A reader with cheap small reads (`small_reads`: the direct reader, whose decoded tiles are
cached) is never asked for a whole block: each region's footprint is read on its own, so
each tile is copied once, straight into its region (k×k means taken straight from the
cached tiles), and tiles in a run's gaps are never decoded; the pixels are the block's.

With `dct_scale` s > 1 (direct reader, JPEG levels; `ProcessSettings.scaled_decode`) the
level's tiles are decoded at 1/s inside libjpeg and the level is treated as one s times
coarser: fewer pixels decoded, not bit-exact (see pipeline/readers/tiff_reader.py).

Resizing a footprint of f·R level pixels to R:
- f within 1 % of 1 (an exact level): the R×R pixels at the footprint origin rounded half up;
- f an integer k and the footprint on whole pixels: the exact k×k block mean, rounded half up;
- otherwise: PIL's BOX filter over the float footprint box (an area average whose
  edge pixels count whole or not at all, with 8-bit rounding between its two passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.area import mean_into
from pipeline.grid import LEVEL_TOLERANCE, RegionGrid
from pipeline.readers import as_reader

INTEGER_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class _Footprint:
    """One region's footprint in level pixels: float box [x0, x1) × [y0, y1)."""

    x0: float
    y0: float
    x1: float
    y1: float


def block_mean_uint8(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Exact k×k block mean, rounded half up: (h·k, w·k, c) uint8 → (h, w, c) uint8 (a new array).

    RGB goes through `pipeline.area.mean_into` (numba; no copy of a window of a larger array);
    other channel counts through the numpy sum.
    """
    h, w = pixels.shape[0] // factor, pixels.shape[1] // factor
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return mean_into(pixels, factor, np.empty((h, w, 3), np.uint8))
    return _block_mean_numpy(pixels, factor)


def _block_mean_numpy(pixels: np.ndarray, factor: int) -> np.ndarray:
    h, w = pixels.shape[0] // factor, pixels.shape[1] // factor
    count = factor * factor
    # k² strided adds are ~5× faster than a reshape-sum over the interleaved axes.
    dtype = np.uint16 if count <= 256 else np.uint32
    total = np.zeros((h, w, pixels.shape[2]), dtype)
    for dy in range(factor):
        for dx in range(factor):
            total += pixels[dy : h * factor : factor, dx : w * factor : factor]
    return ((total + count // 2) // count).astype(np.uint8)


class _LoadedBlock:
    """A run's block held in memory: (h, w, 3) uint8 level px (a reader without cheap small reads)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self.height, self.width = pixels.shape[:2]

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """block[y0:y1, x0:x1] (0 ≤ y0, x0; the ends clipped to the block), a view."""
        return self.pixels[y0:y1, x0:x1]

    def mean(self, y0: int, x0: int, factor: int, size: int) -> np.ndarray:
        """The k×k mean of block[y0 : y0 + k·size, x0 : x0 + k·size]: (size, size, 3) uint8."""
        return block_mean_uint8(self.window(y0, y0 + factor * size, x0, x0 + factor * size), factor)


class _ReaderBlock:
    """The same block, never assembled: each window is read from the reader when asked for.

    For a reader whose small reads are cheap (`small_reads`: decoded tiles cached, no per-call
    overhead to speak of), so that every tile is copied once, straight into its region, the
    k×k means are taken straight from the cached tiles (`read_level_mean`), and tiles in the
    gaps between a run's regions are never decoded. The pixels are those of `_LoadedBlock`
    over `reader.read_level(level, xa, ya, width, height)`: a window is clipped to the block
    exactly as a slice of it would be.
    """

    def __init__(self, reader, level: int, xa: int, ya: int, width: int, height: int, read_kw: dict):
        self.reader, self.level, self.xa, self.ya = reader, level, xa, ya
        self.width, self.height, self.read_kw = width, height, read_kw

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        y1, x1 = min(y1, self.height), min(x1, self.width)
        return self.reader.read_level(self.level, self.xa + x0, self.ya + y0, x1 - x0, y1 - y0, **self.read_kw)

    def mean(self, y0: int, x0: int, factor: int, size: int) -> np.ndarray:
        x, y = self.xa + x0, self.ya + y0
        if self.read_kw or x % factor or y % factor or y0 + factor * size > self.height or x0 + factor * size > self.width:
            return block_mean_uint8(self.window(y0, y0 + factor * size, x0, x0 + factor * size), factor)
        return self.reader.read_level_mean(self.level, x // factor, y // factor, size, size, factor)


def _is_integer(value: float) -> bool:
    return abs(value - round(value)) <= INTEGER_TOLERANCE


def resize_footprint(
    block: np.ndarray | _LoadedBlock | _ReaderBlock, box: _Footprint, region_size: int, exact_level: bool
) -> np.ndarray:
    """Cut one footprint (box in the block's pixel coordinates) out of `block` and resize it to R×R.

    block: (h, w, 3) uint8 level px, or a block object (`_LoadedBlock`, `_ReaderBlock`)
    → (R, R, 3) uint8. See the module docstring for the three cases.
    """
    if isinstance(block, np.ndarray):
        block = _LoadedBlock(block)
    size = region_size
    if exact_level:
        # Half up, not Python's half-to-even: box coordinates are relative to the block's integer
        # corner, so half-to-even would pick a different pixel for the same region in another block.
        x, y = math.floor(box.x0 + 0.5), math.floor(box.y0 + 0.5)
        return np.ascontiguousarray(block.window(y, y + size, x, x + size))
    factor = (box.x1 - box.x0) / size
    if _is_integer(factor) and _is_integer(box.x0) and _is_integer(box.y0):
        k, x, y = round(factor), round(box.x0), round(box.y0)
        return block.mean(y, x, k, size)
    # Hand PIL only the footprint's pixels: converting the whole block per region would copy it each time.
    x, y = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
    cut = np.ascontiguousarray(block.window(y, math.ceil(box.y1), x, math.ceil(box.x1)))
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


def dct_scale_for(reader, level: int, resize_factor: float) -> int:
    """The largest DCT-domain scale s (1/2, 1/4, 1/8) with s ≤ `resize_factor` (within the level
    tolerance) that `reader` offers at `level`; 1 when none (exact decoding)."""
    scales = getattr(reader, "scales", lambda _: ())(level)
    fitting = [s for s in scales if s <= resize_factor * (1 + LEVEL_TOLERANCE)]
    return max(fitting, default=1)


def iter_regions(
    slide,
    grid: RegionGrid,
    level: int,
    region_size: int,
    *,
    resize_factor: float | None = None,
    block_px: int = 8192,
    max_gap: int = 2,
    dct_scale: int = 1,
) -> Iterator[np.ndarray]:
    """Yield each region of `grid` as (R, R, 3) uint8 RGB (on white), in the grid's order.

    Reads one grid row at a time, in runs of neighbouring regions: one read per run of
    at most `block_px` level pixels in width (a run also breaks at more than `max_gap`
    empty columns), so memory stays at one block (block_px · footprint · 7 bytes) and
    only the regions' own rows are decoded.
    slide: a `pipeline.readers.SlideReader` (or an open `openslide.OpenSlide`);
    level: the pyramid level to read (see `pipeline.grid.choose_level`); resize_factor:
    its factor, where 1.0 means the level is exact (no resize); None derives it from
    grid.step and the level's downsample; dct_scale: decode the level at 1/dct_scale
    (see `dct_scale_for`; 1 = exact).
    """
    if len(grid) == 0:
        return
    reader = as_reader(slide)
    rows = grid.coords[:, 0]
    if np.any(np.diff(rows) < 0):
        raise ValueError("grid regions must be in row-major order")
    downsample = reader.level_downsamples[level] * dct_scale
    span = grid.step / downsample  # footprint side in (scaled) level px
    if dct_scale != 1:
        # Keep the exact path's geometry (an area resize of the float footprint): snapping a
        # footprint within 1 % of R to R pixels would shift fine texture by up to half a pixel.
        exact_level = False
    elif resize_factor is None:
        exact_level = abs(span - region_size) <= LEVEL_TOLERANCE * region_size
    else:
        exact_level = resize_factor == 1.0
    read_kw = {"scale": dct_scale} if dct_scale != 1 else {}
    reach = max(span, float(region_size)) if exact_level else span
    fx = grid.origin[:, 0] / downsample
    fy = grid.origin[:, 1] / downsample
    reader.reserve_cache(level)
    small_reads = getattr(reader, "small_reads", False)
    row_starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 1))
    for first, last in zip(row_starts, list(row_starts[1:]) + [len(rows)]):
        members_of_row = np.arange(first, last)
        for start, stop in _row_runs(grid.coords[first:last, 1], reach, block_px, max_gap):
            members = members_of_row[start:stop]
            xa = math.floor(fx[members].min() + INTEGER_TOLERANCE)
            ya = math.floor(fy[members].min() + INTEGER_TOLERANCE)
            xb = math.ceil(fx[members].max() + reach - INTEGER_TOLERANCE)
            yb = math.ceil(fy[members].max() + reach - INTEGER_TOLERANCE)
            if exact_level:
                xb = max(xb, int(np.floor(fx[members] + 0.5).max()) + region_size)
                yb = max(yb, int(np.floor(fy[members] + 0.5).max()) + region_size)
            if small_reads:
                block = _ReaderBlock(reader, level, xa, ya, xb - xa, yb - ya, read_kw)
            else:
                block = _LoadedBlock(reader.read_level(level, xa, ya, xb - xa, yb - ya, **read_kw))
            for i in members:
                box = _Footprint(x0=fx[i] - xa, y0=fy[i] - ya, x1=fx[i] - xa + span, y1=fy[i] - ya + span)
                yield resize_footprint(block, box, region_size, exact_level)
