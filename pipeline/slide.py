"""Slide files: opening through OpenSlide with specific errors, RGB reads on white, MPP and fingerprint.

The backends that read pixels live in `pipeline.readers` (direct TIFF decoding, OpenSlide);
this module holds what every backend shares: the errors, the file checks, the MPP order
and the fingerprint, which must not depend on the backend (switching readers re-tiles nothing).

Coordinates are level-0 pixels (x, y) unless a name says otherwise; MPP is µm/px.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import openslide
import tifffile

MIB = 1 << 20


class SlideError(Exception):
    """A slide that cannot be used; the message says why."""


class SlideNotFoundError(SlideError):
    """The slide file does not exist."""


class NotASlideError(SlideError):
    """OpenSlide does not recognise the file as a slide."""


class UnreadableSlideError(SlideError):
    """A slide OpenSlide recognises but cannot read (e.g. a truncated file)."""


class NoMppError(SlideError):
    """No resolution: neither the manifest, the slide's MPP nor its objective power gives one."""


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a slide with OpenSlide, and check that its pixels can be read.

    Raises SlideNotFoundError, NotASlideError (unknown format) or UnreadableSlideError
    (a known format that fails to read, typically a truncated or corrupt file).
    """
    path = Path(path)
    check_slide_file(path)
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        truncated = _tiff_truncation(path)
        if truncated:
            raise UnreadableSlideError(f"truncated file: {path}: {truncated}") from None
        raise NotASlideError(f"not a slide OpenSlide can read (unsupported or unrecognised format): {path}") from None
    except openslide.OpenSlideError as error:
        raise UnreadableSlideError(f"unreadable slide (truncated or corrupt?): {path}: {error}") from None
    _check_readable(slide, path)
    return slide


def check_slide_file(path: Path) -> None:
    """Raise SlideNotFoundError / NotASlideError / UnreadableSlideError for a path that is
    missing, not a file, or empty."""
    if not path.exists():
        raise SlideNotFoundError(f"slide file not found: {path}")
    if not path.is_file():
        raise NotASlideError(f"not a slide file (a directory?): {path}")
    if path.stat().st_size == 0:
        raise UnreadableSlideError(f"empty file (0 bytes): {path}")


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_truncation(path: Path) -> str | None:
    """Why a TIFF-family file (.svs, .tif, ...) looks truncated, or None when it does not."""
    with open(path, "rb") as handle:
        header = handle.read(16)
    if header[:4] not in TIFF_MAGIC:
        return None
    size = path.stat().st_size
    order = "<" if header[:2] == b"II" else ">"
    big = header[2:4] in (b"+\x00", b"\x00+")
    first_ifd = int.from_bytes(header[8:16] if big else header[4:8], "little" if order == "<" else "big")
    if first_ifd >= size:
        return f"its first TIFF directory is at byte {first_ifd} but the file has {size} bytes"
    try:
        with tifffile.TiffFile(path) as tiff:
            for page in tiff.pages:
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
                if ends and max(ends) > size:
                    return f"image data runs to byte {max(ends)} but the file has {size} bytes"
    except Exception as error:  # noqa: BLE001 — any parse failure of a TIFF header is the answer
        return f"its TIFF structure cannot be parsed ({type(error).__name__}: {error}); the file has {size} bytes"
    return None


def _check_readable(slide: openslide.OpenSlide, path: Path) -> None:
    """Decode a tile at the far corner of every level: a truncated file fails here, not mid-run."""
    try:
        for level, (width, height) in enumerate(slide.level_dimensions):
            if width <= 0 or height <= 0:
                raise UnreadableSlideError(f"level {level} of {path} is empty ({width}×{height})")
            factor = slide.level_downsamples[level]
            x0 = int((width - 1) * factor)
            y0 = int((height - 1) * factor)
            slide.read_region((x0, y0), level, (1, 1))
            slide.read_region((0, 0), level, (1, 1))
    except openslide.OpenSlideError as error:
        slide.close()
        raise UnreadableSlideError(f"unreadable slide (truncated or corrupt?): {path}: {error}") from None


def rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA (what openslide-python returns) on white.

    rgba: (h, w, 4) uint8 → (h, w, 3) uint8: rgb·a/255 + 255·(1 − a/255), rounded.
    Transparent pixels become white, never black.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgb  # a strided view: callers slice it, so a full copy here would be wasted
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def read_rgb(
    slide: openslide.OpenSlide,
    location_level0_xy: tuple[int, int],
    level: int,
    size_wh: tuple[int, int],
) -> np.ndarray:
    """Read a region as RGB on white: (h, w, 3) uint8.

    location_level0_xy: top-left in level-0 pixels; size_wh: (w, h) in pixels of `level`.
    Areas outside the slide or transparent in it come back white.
    """
    x, y = (int(v) for v in location_level0_xy)
    w, h = (int(v) for v in size_wh)
    rgba = np.asarray(slide.read_region((x, y), int(level), (w, h)))
    return rgba_to_rgb_white(rgba)


def resolve_mpp(slide, manifest_mpp: float | None) -> tuple[float, str]:
    """Level-0 µm/px and where it came from, first found wins (DESIGN.md §3).

    slide: a `pipeline.readers.SlideReader` (or an open `openslide.OpenSlide`).
    Order: the manifest's `mpp` ("manifest") → the slide's own MPP, `openslide.mpp-x/y` or
    what the direct reader reads in the same places ("slide", their mean) → an OME-TIFF's
    `PhysicalSizeX/Y` ("ome-physical-size", their mean) → the objective power
    ("objective-power", mpp = 10 / power). Raises NoMppError when none gives a positive value.
    """
    if manifest_mpp is not None:
        if not manifest_mpp > 0:
            raise NoMppError(f"manifest mpp must be positive, got {manifest_mpp!r}")
        return float(manifest_mpp), "manifest"
    from pipeline.readers import as_reader

    meta = (slide if hasattr(slide, "metadata") else as_reader(slide)).metadata()
    if meta.vendor_mpp_xy:
        return float(np.mean(meta.vendor_mpp_xy)), "slide"
    if meta.ome_mpp_xy:
        return float(np.mean(meta.ome_mpp_xy)), "ome-physical-size"
    if meta.objective_power:
        return 10.0 / meta.objective_power, "objective-power"
    raise NoMppError(
        "no MPP: the slide has neither openslide.mpp-x/y, OME PhysicalSizeX/Y nor an objective power; "
        "add its level-0 µm/px in the manifest's mpp column"
    )


def _head_tail_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(MIB))
        if size > MIB:
            handle.seek(max(size - MIB, MIB))
            digest.update(handle.read(MIB))
    return f"{path.name}:{size}:{digest.hexdigest()}"


def _slide_files(path: Path) -> list[Path]:
    """The files a slide consists of: the main file, plus a MIRAX slide's data folder."""
    files = [path]
    if path.suffix.lower() == ".mrxs":
        data_dir = path.with_suffix("")
        if data_dir.is_dir():
            files += sorted(p for p in data_dir.iterdir() if p.is_file())
    return files


def source_fingerprint(path: str | Path, *, require_quickhash: bool = False) -> str:
    """`fingerprint` of a slide file whichever reader tiles it: OpenSlide's quickhash-1 where
    OpenSlide opens the file (opening parses only its directories), else the head-tail digest.
    Raises OSError when the file cannot be read, and openslide.OpenSlideError when
    `require_quickhash` and OpenSlide cannot open it now (a file being copied, say)."""
    path = Path(path)
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError:
        if require_quickhash:
            raise
        return fingerprint(path)
    try:
        return fingerprint(path, slide)
    finally:
        slide.close()


def fingerprint(path: str | Path, slide: openslide.OpenSlide | None = None) -> str:
    """Identity of a slide's content, for resume: `quickhash-1:<hex>` where OpenSlide gives one,
    else `sha256-head-tail:<hex>` over each file's size and the sha256 of its first and last MiB."""
    path = Path(path)
    if slide is not None:
        quickhash = slide.properties.get(openslide.PROPERTY_NAME_QUICKHASH1)
        if quickhash:
            return f"quickhash-1:{quickhash}"
    digest = hashlib.sha256()
    for file in _slide_files(path):
        digest.update(_head_tail_digest(file).encode())
    return f"sha256-head-tail:{digest.hexdigest()}"

