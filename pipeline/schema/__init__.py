"""The one module the pipeline and the trainer share: store format v1, codecs, commit protocol, reader.

Importing it registers the `pixel_mamba.jpeg8` zarr codec, so `jpeg` stores open anywhere.
"""

from pipeline.schema.errors import (
    ChecksumError,
    MissingCodecError,
    NotATileStoreError,
    SlideNotFoundError,
    TileStoreError,
    UnsupportedFormatError,
)
from pipeline.schema.reader import SlideArrays, TileStore, open_store

__all__ = [
    "ChecksumError", "MissingCodecError", "NotATileStoreError", "SlideArrays", "SlideNotFoundError",
    "TileStore", "TileStoreError", "UnsupportedFormatError", "open_store",
]
