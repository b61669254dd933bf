"""Read-only access to a tile store: `open_store(url) -> TileStore` (docs/architecture.md).

Works on a local path or an fsspec URL (http://, s3://, ...). Trusts only the slide
table `slides.json`, never a directory listing. For codec `none` on a local store,
`read_slide(...).regions` is an `np.memmap` of the single raw chunk file.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from pipeline.schema import codecs as _codecs  # registers the jpeg codec for zarr
from pipeline.schema.checksums import array_checksum, slide_checksum
from pipeline.schema.commit import SlideTable, parse_table
from pipeline.schema.errors import (
    ChecksumError,
    NotATileStoreError,
    SlideNotFoundError,
    TileStoreError,
    UnsupportedFormatError,
)
from pipeline.schema.format import (
    ARRAY_NAMES,
    COORDS,
    FOREGROUND,
    FORMAT_MAJOR,
    FORMAT_NAME,
    ORIGIN,
    REGIONS,
    ROOT_ATTR_KEY,
    SLIDE_TABLE,
    SLIDES_GROUP,
    SlideRecord,
    StoreAttrs,
)

_RECORD_COLUMNS = (
    "slide_id", "n_regions", "label", "split", "case_id", "source_path",
    "fingerprint", "checksum", "mpp_source", "grid_shape", "extra",
)
_FAILURE_COLUMNS = ("slide_id", "source_path", "reason", "error_type")


@dataclass(frozen=True, kw_only=True)
class SlideArrays:
    """One slide's arrays.

    regions: `(n, R, R, 3) uint8`, an `np.memmap` (codec none, local) or a lazy `zarr.Array`;
    coords: `(n, 2) int32` (row, col) on the grid; origin: `(n, 2) int64` level-0 (x, y) px;
    foreground: `(n,) float32` tissue fraction; attrs: the slide group's attributes (lazy).
    """

    slide_id: str
    regions: np.ndarray | zarr.Array
    coords: np.ndarray
    origin: np.ndarray
    foreground: np.ndarray
    load_attrs: Callable[[], dict[str, Any]] = field(repr=False, compare=False)

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """The slide group's attributes, read on first use (the tissue GeoJSON can be large)."""
        return self.load_attrs()


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class TileStore:
    """A tile store opened read-only. Use `open_store`; attributes are documented there."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        url = os.fspath(url)
        self.url = url.rstrip("/") if "://" in url else url
        self.is_local = _is_local(self.url)
        options = dict(storage_options or {})
        self._fs, self._root = fsspec.core.url_to_fs(self.url, **options)
        self._root = self._root.rstrip("/")
        try:
            root_meta = self._read_json("zarr.json", missing=NotATileStoreError(
                f"{self.url} is not a tile store: it has no zarr.json (wrong path, or creation was interrupted)"
            ))
        except TileStoreError:
            raise
        except Exception as error:  # noqa: BLE001 — network, permission, credentials: say where and what
            hint = (" (s3:// reads the AWS_* environment variables, AWS_ENDPOINT_URL included, or "
                    "--storage-options)" if self.url.startswith("s3://") else "")
            raise TileStoreError(f"cannot read {self.url}: {type(error).__name__}: {error}{hint}") from error
        raw = (root_meta.get("attributes") or {}).get(ROOT_ATTR_KEY)
        if not isinstance(raw, dict):
            raise NotATileStoreError(
                f"{self.url} is not a tile store: its root group has no '{ROOT_ATTR_KEY}' attributes "
                "(creation may have been interrupted; rebuild it with `pm-tiles build`)"
            )
        self._check_format(raw)
        self.attrs = StoreAttrs.from_json(raw)
        _codecs.require_codec(str(self.attrs.codec.get("name")))
        table_bytes = self._read_bytes(SLIDE_TABLE)
        if table_bytes is None:
            raise NotATileStoreError(f"{self.url} is not a complete tile store: {SLIDE_TABLE} is missing")
        self.table: SlideTable = parse_table(table_bytes)
        if self.is_local:
            self._zarr_store = LocalStore(self._root, read_only=True)
        else:
            self._zarr_store = FsspecStore.from_url(self.url, read_only=True, storage_options=options or None)

    def _check_format(self, raw: dict[str, Any]) -> None:
        name, version = raw.get("format"), str(raw.get("version", ""))
        if name != FORMAT_NAME:
            raise UnsupportedFormatError(f"{self.url}: format {name!r} is not {FORMAT_NAME!r}")
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise UnsupportedFormatError(f"{self.url}: unreadable format version {version!r}") from None
        if major != FORMAT_MAJOR:
            raise UnsupportedFormatError(
                f"{self.url}: tile store format version {version} is not supported; "
                f"this reader reads major version {FORMAT_MAJOR} (upgrade the package or rebuild the store)"
            )

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}"

    def _read_bytes(self, key: str) -> bytes | None:
        try:
            return self._fs.cat_file(self._path(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def _read_json(self, key: str, *, missing: Exception) -> dict[str, Any]:
        data = self._read_bytes(key)
        if data is None:
            raise missing
        try:
            return json.loads(data)
        except ValueError as error:
            raise TileStoreError(f"{self.url}/{key} is not valid JSON: {error}") from error

    @property
    def records(self) -> dict[str, SlideRecord]:
        """Complete slides by id (the slide table)."""
        return self.table.slides

    @property
    def slide_ids(self) -> list[str]:
        return sorted(self.table.slides)

    @cached_property
    def slides(self) -> pd.DataFrame:
        """One row per complete slide: the record fields plus the manifest's extra columns."""
        rows = []
        for record in self.table.slides.values():
            row = record.to_json()
            row["grid_shape"] = tuple(record.grid_shape)
            for key, value in record.extra.items():
                row.setdefault(key, value)
            rows.append(row)
        frame = pd.DataFrame(rows, columns=None if rows else list(_RECORD_COLUMNS))
        return frame.sort_values("slide_id", ignore_index=True) if rows else frame

    @cached_property
    def failures(self) -> pd.DataFrame:
        """One row per failed slide: slide_id, source_path, reason, error_type."""
        rows = [f.to_json() for f in self.table.failures.values()]
        return pd.DataFrame(rows, columns=list(_FAILURE_COLUMNS))

    def _record(self, slide_id: str) -> SlideRecord:
        try:
            return self.table.slides[slide_id]
        except KeyError:
            failed = self.table.failures.get(slide_id)
            why = f" (it failed: {failed.reason})" if failed else ""
            raise SlideNotFoundError(f"slide {slide_id!r} is not a complete slide of {self.url}{why}") from None

    def slide_attrs(self, slide_id: str) -> dict[str, Any]:
        """The slide group's attributes."""
        self._record(slide_id)
        meta = self._read_json(f"{SLIDES_GROUP}/{slide_id}/zarr.json", missing=TileStoreError(
            f"slide {slide_id!r} is in {SLIDE_TABLE} but its group is missing from {self.url}"
        ))
        return dict(meta.get("attributes") or {})

    def read_slide(self, slide_id: str, *, whole: bool | None = None) -> SlideArrays:
        """Arrays of one complete slide; regions stay lazy (memmap or zarr array).

        whole: fetch a remote slide's regions file in one request and decode from memory
        (None: yes for remote stores, where zarr would fetch a shard's index and then each
        region with its own range request); False keeps them lazy on the remote store
        (e.g. to decode a few regions of a large slide).
        """
        self._record(slide_id)
        base = f"{SLIDES_GROUP}/{slide_id}"
        try:
            small = {name: self._small_array(f"{base}/{name}") for name in (COORDS, ORIGIN, FOREGROUND)}
            regions = self._memmap_regions(base) if self.is_local else None
            if regions is None and not self.is_local and whole is not False:
                regions = self._fetched_regions(f"{base}/{REGIONS}")
            if regions is None:
                regions = zarr.open_array(self._zarr_store, path=f"{base}/{REGIONS}", mode="r", zarr_format=3)
        except FileNotFoundError as error:
            raise TileStoreError(
                f"slide {slide_id!r} is in {SLIDE_TABLE} but its arrays are missing from {self.url} ({error})"
            ) from None
        return SlideArrays(
            slide_id=slide_id, regions=regions, coords=small[COORDS], origin=small[ORIGIN],
            foreground=small[FOREGROUND], load_attrs=functools.partial(self.slide_attrs, slide_id),
        )

    def _fetched_regions(self, key: str) -> zarr.Array | None:
        """The regions array decoded from an in-memory copy of its stored files (one GET for
        `zarr.json`, one for the chunk or shard); None when its layout is not one chunk file."""
        metadata = self._read_bytes(f"{key}/zarr.json")
        if metadata is None:
            raise FileNotFoundError(f"{key}/zarr.json")
        meta = json.loads(metadata)
        grid = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
        shape = meta.get("shape") or []
        if grid is None or list(grid) != list(shape) or not all(shape):
            return None  # more than one chunk file (not what this writer makes), or empty
        chunk_key = "c/" + "/".join("0" * len(shape))
        data = self._read_bytes(f"{key}/{chunk_key}")
        if data is None:
            raise FileNotFoundError(f"{key}/{chunk_key}")
        memory = MemoryStore(store_dict={"zarr.json": _buffer(metadata), chunk_key: _buffer(data)}, read_only=True)
        return zarr.open_array(memory, mode="r", zarr_format=3)

    def _raw_chunk_layout(self, key: str) -> tuple[np.dtype, tuple[int, ...], str] | None:
        """(dtype, shape, chunk key) when the array at `key` is exactly one uncompressed chunk
        (bytes codec only, default "/" chunk keys), so its chunk file is the raw C-order
        array; None for any other layout."""
        meta = json.loads(self._read_bytes(f"{key}/zarr.json") or b"{}")
        shape = tuple(meta.get("shape", ()))
        codecs = meta.get("codecs") or []
        grid = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
        encoding = meta.get("chunk_key_encoding") or {}
        if (
            not shape or len(codecs) != 1 or codecs[0].get("name") != "bytes"
            or grid is None or tuple(grid) != shape or encoding.get("name") != "default"
            or (encoding.get("configuration") or {}).get("separator", "/") != "/"
        ):
            return None
        little = (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
        dtype = np.dtype(meta["data_type"]).newbyteorder("<" if little else ">")
        return dtype, shape, f"{key}/c/" + "/".join("0" * len(shape))

    def _small_array(self, key: str) -> np.ndarray:
        """A small array (coords, origin, foreground) read as raw bytes when it is one raw chunk:
        one small read instead of zarr's round trips (~0.1 ms instead of ~1 ms an array)."""
        layout = self._raw_chunk_layout(key)
        if layout is not None:
            dtype, shape, chunk_key = layout
            data = self._read_bytes(chunk_key)
            if data is not None and len(data) == dtype.itemsize * int(np.prod(shape)):
                return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
        return zarr.open_array(self._zarr_store, path=key, mode="r", zarr_format=3)[...]

    def _memmap_regions(self, base: str) -> np.ndarray | None:
        """The raw chunk as `np.memmap` when `regions` is one uncompressed uint8 chunk; else None."""
        layout = self._raw_chunk_layout(f"{base}/{REGIONS}")
        if layout is None:
            return None
        dtype, shape, chunk_key = layout
        if len(shape) != 4 or dtype != np.uint8:
            return None
        if shape[0] == 0:
            return np.zeros(shape, np.uint8)
        path = os.path.join(self._root, *chunk_key.split("/"))
        try:
            size = os.path.getsize(path)
        except OSError:
            return None
        if size != int(np.prod(shape)):
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)

    def key_blocks(self, key: str, block: int = 4 << 20) -> tuple[int, Iterator[bytes]] | None:
        """(size, byte blocks) of one stored key, streamed `block` bytes at a time; None when absent."""
        path = self._path(key)
        try:
            size = int(self._fs.size(path))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

        def blocks() -> Iterator[bytes]:
            with self._fs.open(path, "rb", block_size=block) as handle:
                while data := handle.read(block):
                    yield data

        return size, blocks()

    def array_metadata(self, slide_id: str, name: str) -> dict[str, Any] | None:
        """The parsed `zarr.json` of one of a slide's arrays, or None when it is missing."""
        data = self._read_bytes(f"{SLIDES_GROUP}/{slide_id}/{name}/zarr.json")
        return None if data is None else json.loads(data)

    def stored_array_checksum(self, slide_id: str, name: str, metadata: dict[str, Any] | None = None,
                              *, on_block: Callable[[int], None] | None = None) -> str:
        """The content checksum (`pipeline.schema.checksums`) of an array's stored keys, each
        key streamed in blocks (bounded memory whatever the slide size); on_block(nbytes)
        is called per block read. ChecksumError when the array's metadata is missing."""
        key = f"{SLIDES_GROUP}/{slide_id}/{name}"
        metadata = metadata if metadata is not None else self.array_metadata(slide_id, name)
        if metadata is None:
            raise ChecksumError(f"slide {slide_id!r}: array {name!r} is missing")

        def read(sub: str):
            found = self.key_blocks(f"{key}/{sub}")
            if found is None or on_block is None:
                return found
            size, blocks = found
            return size, _counted(blocks, on_block)

        return array_checksum(metadata, read)

    def verify_slide(self, slide_id: str) -> None:
        """Recompute the slide's checksums from its stored bytes (streamed); ChecksumError on
        the first mismatch. `pipeline.verify` checks more (shapes, decoding) and reports all."""
        attrs = self.slide_attrs(slide_id)
        recorded = attrs.get("checksums") or {}
        computed = {}
        for name in ARRAY_NAMES:
            computed[name] = self.stored_array_checksum(slide_id, name)
            if recorded.get(name) != computed[name]:
                raise ChecksumError(f"slide {slide_id!r}: array {name!r} does not match its recorded checksum")
        if slide_checksum(computed) != self._record(slide_id).checksum:
            raise ChecksumError(f"slide {slide_id!r}: content checksum differs from the slide table's")

    def __repr__(self) -> str:
        return (
            f"TileStore({self.url!r}, magnification={self.attrs.magnification:g}, "
            f"codec={self.attrs.codec.get('name')!r}, slides={len(self.table.slides)}, "
            f"failures={len(self.table.failures)})"
        )


def _buffer(data: bytes):
    return default_buffer_prototype().buffer.from_bytes(data)


def _counted(blocks: Iterable[bytes], on_block: Callable[[int], None]) -> Iterator[bytes]:
    for block in blocks:
        on_block(len(block))
        yield block


def open_store(url: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> TileStore:
    """Open a tile store read-only from a local path or an fsspec URL.

    Raises NotATileStoreError (no root attributes), UnsupportedFormatError (other format
    or major version), MissingCodecError (the codec's package is missing, named).
    """
    return TileStore(os.fspath(url), storage_options=storage_options)
