"""Slide readers behind one factory with named choices (`READERS`).

- `direct`: TIFF-family slides (Aperio SVS, OME-TIFF pyramids, generic tiled or stripped
  TIFF) decoded with tifffile + imagecodecs (libjpeg-turbo), without OpenSlide's read path;
- `openslide`: every format OpenSlide opens (the reference);
- `auto` (default): `direct` where it applies, else `openslide`, the reason recorded in
  the reader's `fallback` (and so in the slide table).

Both return the same pixels (tests/pipeline/test_readers_agree.py); the choice is not a
store setting.
"""

from __future__ import annotations

from pathlib import Path

import openslide

from pipeline.readers.base import SlideMetadata, SlideReader
from pipeline.readers.openslide_reader import OpenSlideReader
from pipeline.readers.tiff_reader import DirectUnsupportedError, TiffReader
from pipeline.slide import NotASlideError, check_slide_file

READERS = ("auto", "direct", "openslide")

__all__ = [
    "READERS", "DirectUnsupportedError", "OpenSlideReader", "SlideMetadata", "SlideReader", "TiffReader",
    "as_reader", "open_reader",
]


def open_reader(path: str | Path, reader: str = "auto", *, threads: int = 1) -> SlideReader:
    """Open a slide with the named backend (see the module docstring).

    Raises the `pipeline.slide` errors (SlideNotFoundError, NotASlideError,
    UnreadableSlideError); `direct` on a file it does not handle raises NotASlideError
    with the reason; ValueError for an unknown `reader`.
    """
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    path = Path(path)
    check_slide_file(path)
    if reader == "openslide":
        return OpenSlideReader.open(path)
    try:
        return TiffReader(path, threads=threads)
    except DirectUnsupportedError as error:
        if reader == "direct":
            raise NotASlideError(f"the direct reader cannot read {path}: {error}") from None
        return OpenSlideReader.open(path, fallback=f"direct: {error}")


def as_reader(slide: SlideReader | openslide.OpenSlide) -> SlideReader:
    """A reader for `slide`: readers pass through, an open `openslide.OpenSlide` is wrapped."""
    if isinstance(slide, SlideReader):
        return slide
    if isinstance(slide, openslide.AbstractSlide):
        return OpenSlideReader(slide)
    raise TypeError(f"expected a SlideReader or an openslide slide, got {type(slide).__name__}")
