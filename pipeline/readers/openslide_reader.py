"""The OpenSlide backend: every format OpenSlide opens, and the reference for the direct reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from pipeline.readers.base import SlideMetadata, SlideReader
from pipeline.readers.ome import ome_physical_size
from pipeline.slide import open_slide, rgba_to_rgb_white

DEFAULT_CACHE_BYTES = 32 << 20  # OpenSlide's own default
MAX_CACHE_BYTES = 512 << 20


def _positive(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else float("nan")
    except ValueError:
        return None
    return number if np.isfinite(number) and number > 0 else None


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide (`slide`: an open `openslide.OpenSlide`).

    Level px (x, y) of level k is read at level-0 (round(x·d_k), round(y·d_k)), as the
    extraction always did, so this backend reproduces earlier stores exactly.
    """

    name = "openslide"

    def __init__(self, slide: openslide.OpenSlide, path: str | Path | None = None, *, fallback: str | None = None):
        self.slide = slide
        self.path = Path(path) if path is not None else Path(getattr(slide, "_filename", ""))
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
        self.fallback = fallback

    @classmethod
    def open(cls, path: str | Path, *, fallback: str | None = None) -> "OpenSlideReader":
        """Open with `pipeline.slide.open_slide`'s checks and specific errors."""
        return cls(open_slide(path), path, fallback=fallback)

    @property
    def properties(self):
        return self.slide.properties

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        return self.read_rgb((round(x * downsample), round(y * downsample)), level, (width, height))

    def read_rgb(self, location_level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        x, y = (int(v) for v in location_level0_xy)
        w, h = (int(v) for v in size_wh)
        return rgba_to_rgb_white(np.asarray(self.slide.read_region((x, y), int(level), (w, h))))

    def metadata(self) -> SlideMetadata:
        props = self.slide.properties
        mpp = [_positive(props.get(k)) for k in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)]
        mpp = [v for v in mpp if v is not None]
        vendor = (mpp[0], mpp[-1]) if mpp else None
        return SlideMetadata(
            vendor_mpp_xy=vendor,
            ome_mpp_xy=ome_physical_size(self.path) if self.path.suffix.lower() in (".tif", ".tiff") else None,
            objective_power=_positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        )

    def reserve_cache(self, level: int) -> None:
        if not hasattr(openslide, "OpenSlideCache"):
            return
        props = self.slide.properties
        tile_h = int(props.get(f"openslide.level[{level}].tile-height", 256) or 256)
        wanted = min(MAX_CACHE_BYTES, max(DEFAULT_CACHE_BYTES, 3 * tile_h * self.level_dimensions[level][0] * 4))
        if wanted > DEFAULT_CACHE_BYTES:
            self.slide.set_cache(openslide.OpenSlideCache(wanted))

    def close(self) -> None:
        self.slide.close()
