"""The slide-reader interface every backend implements (`pipeline.readers` picks one).

A reader exposes a slide's pyramid (level sizes and downsamples, level 0 first), its
resolution metadata, and one pixel operation: `read_level`, a block of one level in that
level's own pixel coordinates, RGB on white. Everything downstream (tissue, extraction,
QC) uses only this, so a backend swap changes no other module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, kw_only=True)
class SlideMetadata:
    """Resolution facts a slide carries, each None when absent (µm/px).

    vendor_mpp_xy: what OpenSlide reports as `openslide.mpp-x/y` (Aperio `MPP`, TIFF
    resolution tags in cm or inch); ome_mpp_xy: an OME-TIFF's `PhysicalSizeX/Y` in µm;
    objective_power: the scan's objective magnification (Aperio `AppMag`).
    """

    vendor_mpp_xy: tuple[float, float] | None = None
    ome_mpp_xy: tuple[float, float] | None = None
    objective_power: float | None = None


class SlideReader(ABC):
    """An open slide. Subclasses set `name`, `path`, `level_dimensions` ((w, h) per level)
    and `level_downsamples` (level-0 px per level px, OpenSlide's definition: the mean of
    the width and height ratios), and implement `read_level`, `metadata` and `close`.

    `fallback` is the reason the factory fell back to this backend (None when it did not).
    """

    name: str
    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    fallback: str | None = None

    @abstractmethod
    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels [x, x + width) × [y, y + height) of `level`, in that level's px:
        (height, width, 3) uint8 RGB; anything outside the level (or transparent) is white."""

    @abstractmethod
    def metadata(self) -> SlideMetadata:
        """The slide's resolution metadata (see `SlideMetadata`)."""

    # True for a backend whose small reads cost little more than their pixels (decoded tiles
    # cached, no per-call overhead to speak of): `pipeline.extract` then reads region by region.
    small_reads: bool = False

    def read_level_mean(self, level: int, x: int, y: int, width: int, height: int, factor: int) -> np.ndarray:
        """The exact `factor`×`factor` mean (rounded half up) of `level`'s pixels: (height, width, 3)
        uint8, pixel (i, j) averaging level px [(x + j)·k, (x + j + 1)·k) × [(y + i)·k, (y + i + 1)·k)
        (white outside the level), i.e. `block_mean_uint8(read_level(level, x·k, y·k, width·k,
        height·k), k)`, which is what this default does."""
        from pipeline.area import mean_into

        block = self.read_level(level, x * factor, y * factor, width * factor, height * factor)
        return mean_into(block, factor, np.empty((height, width, 3), np.uint8))

    def reserve_cache(self, level: int) -> None:
        """Keep decoded tiles of two rows of tiles across `level`, so that a tile shared by two
        grid rows is decoded once (callers reading a level row by row call this first)."""

    def close(self) -> None:
        """Release the file."""

    @property
    def description(self) -> str:
        """What the slide table records: the backend, and why it was chosen when it was a fallback."""
        return self.name if self.fallback is None else f"{self.name} (fallback: {self.fallback})"

    def read_rgb(self, location_level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """OpenSlide-style call: top-left in level-0 px, size in `level` px: (h, w, 3) uint8."""
        downsample = self.level_downsamples[level]
        x0, y0 = location_level0_xy
        return self.read_level(level, round(x0 / downsample), round(y0 / downsample), *size_wh)

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
