"""The direct backend: TIFF-family slides decoded without OpenSlide.

tifffile parses the file (Aperio SVS, OME-TIFF with SubIFD levels, generic tiled or stripped
pyramidal TIFF) and locates each level's tiles or strips; the compressed bytes are read with
`os.pread` and JPEG tiles are decoded by libjpeg-turbo through `imagecodecs.jpeg8_decode` (with
the level's JPEGTables and the colour space the TIFF's photometric tag names); other
compressions go through tifffile's own imagecodecs decoders. Blocks are assembled exactly as
OpenSlide returns them: a tile's pixels past the level's edge, missing (0-byte) tiles and
everything outside the level are white.

Anything this backend does not handle (another vendor's layout, a compression, sample format
or planar layout it does not read) raises `DirectUnsupportedError` at open, with the reason,
and the factory falls back to OpenSlide.

DCT-domain scaled decoding (`read_level(..., scale=2|4|8)`) decodes JPEG tiles at 1/scale inside
libjpeg (Pillow's draft mode): ~scale² fewer pixels to produce, not bit-exact with decoding in
full and averaging (libjpeg's scaled IDCT is its own filter). Off unless asked for.
"""

from __future__ import annotations

import io
import math
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from tifffile.tifffile import svs_description_metadata
from PIL import Image

from pipeline.area import mean_window_into
from pipeline.readers.base import SlideMetadata, SlideReader
from pipeline.readers.ome import ome_pixel_size_from_xml
from pipeline.slide import UnreadableSlideError

JPEG = 7
NONE = 1
# Compressions tifffile decodes with imagecodecs and whose pixels need no colour handling here.
OTHER_COMPRESSIONS = {NONE: "none", 5: "LZW", 8: "deflate", 32946: "deflate", 50000: "zstd", 32773: "packbits"}
RGB, YCBCR = 2, 6
SCALES = (2, 4, 8)
DEFAULT_CACHE_BYTES = 32 << 20
MAX_CACHE_BYTES = 512 << 20
# Adobe APP14 marker with transform 0: tells libjpeg the three components are R, G, B (no YCbCr
# conversion), for Aperio's RGB-coded JPEG tiles decoded through Pillow.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class DirectUnsupportedError(Exception):
    """The direct reader does not handle this file; the message says why (recorded as the fallback reason)."""


@dataclass(frozen=True, kw_only=True)
class _Level:
    """Where one level's pixels are: tiles (or strips: tile_w = width, tile_h = rows per strip)."""

    page: tifffile.TiffPage
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    counts: np.ndarray
    jpeg: bool
    tables: bytes | None
    colorspace: str
    raw_strips: bool  # uncompressed strips: rows are read straight from the file, a band at a time

    @property
    def across(self) -> int:
        return math.ceil(self.width / self.tile_w)

    @property
    def down(self) -> int:
        return math.ceil(self.height / self.tile_h)


class TiffReader(SlideReader):
    """A TIFF-family slide decoded directly (see the module docstring).

    threads: decoder threads per block read (imagecodecs releases the GIL); 1 inside a
    multi-process build, more when one process tiles alone.
    """

    name = "direct"
    small_reads = True  # tiles are cached: `pipeline.extract` reads region by region

    def __init__(self, path: str | Path, *, threads: int = 1):
        self.path = Path(path)
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None
        try:
            self._tiff = tifffile.TiffFile(self.path)
        except Exception as error:  # noqa: BLE001 — whatever tifffile refuses, OpenSlide may still read
            raise DirectUnsupportedError(f"tifffile cannot parse it ({type(error).__name__}: {error})") from None
        try:
            self._levels = self._find_levels()
            self._check_extent()
            self.level_dimensions = tuple((lv.width, lv.height) for lv in self._levels)
            w0, h0 = self.level_dimensions[0]
            self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
            self._fd = os.open(self.path, os.O_RDONLY)
            self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
            self._cache_bytes = 0
            self._cache_limit = DEFAULT_CACHE_BYTES
            self._probe()
        except BaseException:
            self._tiff.close()
            if hasattr(self, "_fd"):
                os.close(self._fd)
            raise

    # ------------------------------------------------------------------ structure

    def _find_levels(self) -> list[_Level]:
        tiff = self._tiff
        for flag in ("ndpi", "philips", "scn", "bif", "qpi", "mmstack", "nih", "stk", "lsm"):
            if getattr(tiff, f"is_{flag}", False):
                raise DirectUnsupportedError(f"{flag} layout (OpenSlide reads its vendor specifics)")
        if not tiff.series:
            raise DirectUnsupportedError("no image series")
        if tiff.is_svs or tiff.is_ome:
            pages = []
            for index, level in enumerate(tiff.series[0].levels):
                if len(level.pages) != 1:
                    raise DirectUnsupportedError(f"level {index} has {len(level.pages)} planes (z/t/channel stacks)")
                pages.append(level.keyframe)
        else:
            pages = _generic_levels(tiff)
        levels = [self._level(index, page) for index, page in enumerate(pages)]
        if not levels:
            raise DirectUnsupportedError("no levels")
        if any(b.width > a.width or b.height > a.height for a, b in zip(levels, levels[1:])):
            raise DirectUnsupportedError("levels are not ordered from largest to smallest")
        return levels

    def _level(self, index: int, page: tifffile.TiffPage) -> _Level:
        where = f"level {index}"
        if page.planarconfig != 1:
            raise DirectUnsupportedError(f"{where} stores colour planes separately")
        if page.dtype != np.uint8 or page.samplesperpixel != 3 or page.shape[-1:] != (3,) or len(page.shape) != 3:
            raise DirectUnsupportedError(
                f"{where} is {page.shape} {page.dtype} with {page.samplesperpixel} samples (needs 8-bit RGB)"
            )
        compression, photometric = int(page.compression), int(page.photometric)
        jpeg = compression == JPEG
        if jpeg and photometric not in (RGB, YCBCR):
            raise DirectUnsupportedError(f"{where}: JPEG with photometric {photometric}")
        if not jpeg and (compression not in OTHER_COMPRESSIONS or photometric != RGB):
            raise DirectUnsupportedError(f"{where}: compression {compression}, photometric {photometric}")
        if page.is_tiled:
            if page.tiledepth > 1:
                raise DirectUnsupportedError(f"{where} has volumetric tiles")
            tile_w, tile_h = page.tilewidth, page.tilelength
        else:
            tile_w, tile_h = page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)
        offsets, counts = np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)
        expected = math.ceil(page.imagewidth / tile_w) * math.ceil(page.imagelength / tile_h)
        if len(offsets) != expected:
            raise DirectUnsupportedError(f"{where} has {len(offsets)} tiles/strips, its size implies {expected}")
        return _Level(
            page=page, width=int(page.imagewidth), height=int(page.imagelength), tile_w=int(tile_w), tile_h=int(tile_h),
            offsets=offsets, counts=counts, jpeg=jpeg, tables=page.jpegtables if jpeg else None,
            colorspace="YCBCR" if photometric == YCBCR else "RGB",
            raw_strips=compression == NONE and not page.is_tiled,
        )

    def _check_extent(self) -> None:
        size = self.path.stat().st_size
        for index, level in enumerate(self._levels):
            ends = level.offsets + level.counts
            if len(ends) and int(ends.max()) > size:
                raise UnreadableSlideError(
                    f"truncated file: {self.path}: level {index}'s image data runs to byte {int(ends.max())} "
                    f"but the file has {size} bytes"
                )

    def _probe(self) -> None:
        """Decode the first and last tile of every level: what this backend cannot decode is found
        now (and falls back), not mid-slide."""
        for index, level in enumerate(self._levels):
            for tile in sorted({0, len(level.offsets) - 1}):
                if level.counts[tile] == 0 or level.raw_strips:
                    continue
                try:
                    pixels = self._decode(level, tile, 1)
                except Exception as error:  # noqa: BLE001 — the decoder's message is the reason
                    raise DirectUnsupportedError(
                        f"level {index} tile {tile} does not decode ({type(error).__name__}: {error})"
                    ) from None
                if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[1] < min(level.tile_w, level.width):
                    raise DirectUnsupportedError(f"level {index} tile {tile} decodes to {pixels.shape}")
                self._remember((index, 1, tile), pixels)  # e.g. a corner of the overview level: not decoded twice

    # ------------------------------------------------------------------ metadata

    def metadata(self) -> SlideMetadata:
        tiff, page = self._tiff, self._levels[0].page
        vendor = None
        power = None
        if tiff.is_svs:
            meta = svs_description_metadata(page.description)
            mpp = meta.get("MPP")
            vendor = (float(mpp), float(mpp)) if mpp and float(mpp) > 0 else None
            power = float(meta["AppMag"]) if meta.get("AppMag") and float(meta["AppMag"]) > 0 else None
        else:
            vendor = _resolution_mpp(page)
        ome = ome_pixel_size_from_xml(tiff.ome_metadata) if tiff.is_ome and tiff.ome_metadata else None
        return SlideMetadata(vendor_mpp_xy=vendor, ome_mpp_xy=ome, objective_power=power)

    # ------------------------------------------------------------------ pixels

    def scales(self, level: int) -> tuple[int, ...]:
        """The DCT-domain scales (1/s) available at `level`: JPEG tiles whose sides s divides."""
        lv = self._levels[level]
        if not lv.jpeg:
            return ()
        return tuple(s for s in SCALES if lv.tile_w % s == 0 and lv.tile_h % s == 0)

    def reserve_cache(self, level: int) -> None:
        lv = self._levels[level]
        wanted = 3 * lv.tile_h * lv.width * 3
        self._cache_limit = min(MAX_CACHE_BYTES, max(DEFAULT_CACHE_BYTES, wanted))

    def read_level(self, level: int, x: int, y: int, width: int, height: int, *, scale: int = 1) -> np.ndarray:
        """See `SlideReader.read_level`; with `scale` s > 1 (JPEG levels, s in `scales(level)`),
        x, y, width, height are in units of s level px and the tiles are decoded at 1/s (inexact)."""
        lv = self._levels[level]
        if scale != 1 and scale not in self.scales(level):
            raise ValueError(f"scale 1/{scale} is not available at level {level} (available: {self.scales(level)})")
        out = np.empty((int(height), int(width), 3), np.uint8)
        level_w, level_h = math.ceil(lv.width / scale), math.ceil(lv.height / scale)
        inside = x >= 0 and y >= 0 and x + width <= level_w and y + height <= level_h
        if not inside:
            out.fill(255)
        tile_w, tile_h = lv.tile_w // scale, lv.tile_h // scale
        xa, ya = max(int(x), 0), max(int(y), 0)
        xb, yb = min(int(x) + int(width), level_w), min(int(y) + int(height), level_h)
        if xa >= xb or ya >= yb:
            out.fill(255)
            return out
        if lv.raw_strips:
            out[ya - y : yb - y, xa - x : xb - x] = self._raw_rows(lv, ya, yb)[:, xa:xb]
            return out
        tiles = _tiles_under(xa, ya, xb, yb, tile_w, tile_h)
        decoded = self._tiles(level, lv, [ty * lv.across + tx for ty, tx in tiles], scale)
        if inside and any(pixels is None for pixels in decoded):
            out.fill(255)
        for (ty, tx), pixels in zip(tiles, decoded):
            if pixels is None:
                continue  # a missing tile is transparent in OpenSlide: white
            tx0, ty0 = tx * tile_w, ty * tile_h
            # Clip to the block and to the level: tile padding past the edge is not image.
            cx0, cy0 = max(tx0, xa), max(ty0, ya)
            cx1 = min(tx0 + pixels.shape[1], xb, level_w)
            cy1 = min(ty0 + pixels.shape[0], yb, level_h)
            if cx0 < cx1 and cy0 < cy1:
                out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = pixels[cy0 - ty0 : cy1 - ty0, cx0 - tx0 : cx1 - tx0]
        return out

    def read_level_mean(self, level: int, x: int, y: int, width: int, height: int, factor: int) -> np.ndarray:
        """See `SlideReader.read_level_mean`. When the footprint lies inside the level and k divides
        the tile sides, each tile is averaged straight from the tile cache into the result (no block
        of level pixels is assembled); otherwise through `read_level`, as the default does."""
        lv, k = self._levels[level], int(factor)
        xa, ya, xb, yb = x * k, y * k, (x + width) * k, (y + height) * k
        if (k == 1 or lv.raw_strips or lv.tile_w % k or lv.tile_h % k or width <= 0 or height <= 0
                or xa < 0 or ya < 0 or xb > lv.width or yb > lv.height):
            return super().read_level_mean(level, x, y, width, height, factor)
        out = np.empty((int(height), int(width), 3), np.uint8)
        tiles = _tiles_under(xa, ya, xb, yb, lv.tile_w, lv.tile_h)
        decoded = self._tiles(level, lv, [ty * lv.across + tx for ty, tx in tiles], 1)
        for (ty, tx), pixels in zip(tiles, decoded):
            tx0, ty0 = tx * lv.tile_w, ty * lv.tile_h
            # Tile sides and the footprint's corners are multiples of k: each piece is whole k×k cells.
            cx0, cy0 = max(tx0, xa), max(ty0, ya)
            cx1, cy1 = min(tx0 + lv.tile_w, xb), min(ty0 + lv.tile_h, yb)
            oy, ox, h, w = (cy0 - ya) // k, (cx0 - xa) // k, (cy1 - cy0) // k, (cx1 - cx0) // k
            if pixels is None:
                out[oy : oy + h, ox : ox + w] = 255  # a missing tile is white, and so is its mean
            elif pixels.shape[0] < cy1 - ty0 or pixels.shape[1] < cx1 - tx0 or not pixels.flags.c_contiguous:
                return super().read_level_mean(level, x, y, width, height, factor)
            else:
                mean_window_into(pixels, cy0 - ty0, cx0 - tx0, k, out, oy, ox, h, w)
        return out

    def _tiles(self, level: int, lv: _Level, indices: list[int], scale: int) -> list[np.ndarray | None]:
        found: dict[int, np.ndarray | None] = {}
        todo = []
        for index in indices:
            key = (level, scale, index)
            if key in self._cache:
                self._cache.move_to_end(key)
                found[index] = self._cache[key]
            elif lv.counts[index] == 0:
                found[index] = None
            else:
                todo.append(index)
        if self.threads > 1 and len(todo) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tile-decode")
            results = list(self._pool.map(lambda i: self._decode(lv, i, scale), todo))
        else:
            results = [self._decode(lv, i, scale) for i in todo]
        for index, pixels in zip(todo, results):
            found[index] = pixels
            self._remember((level, scale, index), pixels)
        return [found[i] for i in indices]

    def _remember(self, key: tuple[int, int, int], pixels: np.ndarray) -> None:
        self._cache[key] = pixels
        self._cache_bytes += pixels.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= dropped.nbytes

    def _decode(self, lv: _Level, index: int, scale: int) -> np.ndarray:
        data = os.pread(self._fd, int(lv.counts[index]), int(lv.offsets[index]))
        if lv.jpeg:
            if scale == 1:
                return imagecodecs.jpeg8_decode(data, tables=lv.tables, colorspace=lv.colorspace, outcolorspace="RGB")
            return _jpeg_scaled(data, lv, scale)
        segment, _, _ = lv.page.decode(data, index)
        return segment.reshape(-1, segment.shape[-2], segment.shape[-1])

    def _raw_rows(self, lv: _Level, ya: int, yb: int) -> np.ndarray:
        """Rows [ya, yb) of an uncompressed stripped level, read from the file without whole strips."""
        stride = lv.width * 3
        rows = np.empty((yb - ya, lv.width, 3), np.uint8)
        row = ya
        while row < yb:
            strip, within = divmod(row, lv.tile_h)
            take = min(yb - row, lv.tile_h - within)
            data = os.pread(self._fd, take * stride, int(lv.offsets[strip]) + within * stride)
            rows[row - ya : row - ya + take] = np.frombuffer(data, np.uint8).reshape(take, lv.width, 3)
            row += take
        return rows

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tiff.close()
        self._cache.clear()


def _tiles_under(xa: int, ya: int, xb: int, yb: int, tile_w: int, tile_h: int) -> list[tuple[int, int]]:
    """(row, col) of the tiles (tile_w × tile_h px) that [xa, xb) × [ya, yb) touches, row-major."""
    return [(ty, tx) for ty in range(ya // tile_h, (yb - 1) // tile_h + 1)
            for tx in range(xa // tile_w, (xb - 1) // tile_w + 1)]


def _generic_levels(tiff: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """A generic TIFF's levels as OpenSlide's generic-tiff backend sees them: every tiled
    directory, largest first (tifffile's own series would split a pyramid whose steps are
    not all 2×); a stripped TIFF: its first directory and any reduced-resolution ones."""
    pages = [tiff.pages[i] for i in range(len(tiff.pages))]
    if pages[0].is_tiled:
        chosen = [p for p in pages if p.is_tiled]
    else:
        chosen = [pages[0]] + [p for p in pages[1:] if int(p.subfiletype) & 1]
    return sorted(chosen, key=lambda p: -int(p.imagewidth))


def _jpeg_scaled(data: bytes, lv: _Level, scale: int) -> np.ndarray:
    """One JPEG tile decoded at 1/scale by libjpeg's scaled IDCT (Pillow draft mode)."""
    if lv.tables:
        data = lv.tables[:-2] + data[2:]  # abbreviated tile + its tables = one interchange stream
    if lv.colorspace == "RGB":
        data = data[:2] + _ADOBE_RGB + data[2:]
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (lv.tile_w // scale, lv.tile_h // scale))
    pixels = np.asarray(image.convert("RGB"))
    if pixels.shape[:2] != (lv.tile_h // scale, lv.tile_w // scale):
        raise DirectUnsupportedError(f"scaled decode gave {pixels.shape[:2]}, expected 1/{scale} of the tile")
    return pixels


def _resolution_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """µm/px from the TIFF resolution tags, as OpenSlide reads them (unit cm or inch)."""
    unit = page.tags.get("ResolutionUnit")
    per_um = {2: 1 / 25400, 3: 1e-4}.get(int(unit.value) if unit is not None else 2)
    if per_um is None:
        return None
    values = []
    for name in ("XResolution", "YResolution"):
        tag = page.tags.get(name)
        if tag is None:
            return None
        numerator, denominator = tag.value
        if not numerator or not denominator:
            return None
        values.append(1.0 / (numerator / denominator * per_um))
    return values[0], values[1]
