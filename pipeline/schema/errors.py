"""Errors raised when reading or writing a tile store (all subclass `TileStoreError`)."""

from __future__ import annotations


class TileStoreError(Exception):
    """Base class of every tile store error; the CLI prints these without a traceback."""


class NotATileStoreError(TileStoreError):
    """The location holds no tile store root attributes (missing, or creation was interrupted)."""


class UnsupportedFormatError(TileStoreError):
    """The store's format name or major version is not one this reader understands."""


class MissingCodecError(TileStoreError):
    """The store's codec needs a package that is not installed; the message names it."""


class SlideNotFoundError(TileStoreError, KeyError):
    """The slide id is not in the slide table (readers trust only the table)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreMismatchError(TileStoreError):
    """A store already exists at the path with different tiling settings."""


class SlideWriteError(TileStoreError):
    """A slide group could not be written (e.g. the region stream had the wrong length)."""


class ChecksumError(TileStoreError):
    """Stored bytes no longer match the checksums recorded at write time."""
