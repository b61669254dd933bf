"""Creating a tile store and writing one slide group, streamed (DESIGN.md §5).

`write_slide` writes the group under a temporary name, streams the regions straight
into the one chunk file (codec `none`) or the one shard file (`zstd`/`jpeg`, encoded
region by region with the shard index appended at the end, exactly as zarr's
`sharding_indexed` codec lays it out), records checksums, then commits by rename.
The raw chunk (codec `none`) is hashed while it is streamed; a shard is read back to
be hashed, since its size, which the checksum hashes before its bytes, is known only
once it is written.
The slide table is not touched: the driver alone rewrites it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.storage import LocalStore

from pipeline.schema.checksums import ArrayHasher, array_checksum, array_keys, slide_checksum
from pipeline.schema.codecs import region_array_kwargs, region_chunk_encoder, require_codec
from pipeline.schema.commit import (
    EarlyWriteback, SlideTable, commit_group, fsync_file, node_metadata, temp_group_name, write_table,
)
from pipeline.schema.errors import NotATileStoreError, SlideWriteError, StoreMismatchError
from pipeline.schema.format import (
    ARRAY_NAMES,
    COORDS,
    FOREGROUND,
    ORIGIN,
    REGIONS,
    ROOT_ATTR_KEY,
    SLIDE_TABLE,
    SLIDES_GROUP,
    StoreAttrs,
    slide_id_problem,
)

REQUIRED_SLIDE_ATTRS = ("source_path", "fingerprint")
_WRITE_BUFFER = 8 << 20
_NO_CHUNK = np.uint64(2**64 - 1)


def create_store(path: str | os.PathLike, attrs: StoreAttrs) -> StoreAttrs:
    """Create a tile store at `path`, or open the existing one built with the same settings.

    Writes the `slides` group and an empty slide table first and the root attributes
    last, so a store without root attributes is one whose creation was interrupted.
    Raises StoreMismatchError when a store with other settings is there, and
    NotATileStoreError when `path` is a non-empty folder that is not a zarr store.
    Returns the attributes in effect (the existing store's when it already exists).
    """
    root = Path(path)
    require_codec(attrs.codec["name"])
    if not attrs.created:
        attrs = StoreAttrs.from_json({**attrs.to_json(), "created": _dt.datetime.now(_dt.UTC).isoformat()})
    existing = _attrs_or_none(root)
    if existing is not None:
        diff = existing.settings_diff(attrs)
        if diff:
            raise StoreMismatchError(
                f"a tile store with different settings already exists at {root}; "
                f"setting: existing → requested:\n  " + "\n  ".join(diff)
                + "\nre-run without these options to resume with the store's own settings, "
                "or use another --out path"
            )
        return existing
    check_store_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(root / SLIDES_GROUP / "zarr.json", _group_metadata({}))
    if not (root / SLIDE_TABLE).exists():
        write_table(root, SlideTable())
    _write_json_atomic(root / "zarr.json", _group_metadata({ROOT_ATTR_KEY: attrs.to_json()}))
    return attrs


def check_store_folder(path: str | os.PathLike) -> None:
    """NotATileStoreError unless `path` is absent, a zarr store, or what an interrupted
    `create_store` (or a build lock taken before it) leaves: a folder a build may write into."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise NotATileStoreError(f"{root} is a file, not a tile store folder")
    # A zarr.json without root attributes, or only what create_store writes before it, is an
    # interrupted creation: finish it.
    if root.exists() and not (root / "zarr.json").exists() and not _creation_leftovers_only(root):
        raise NotATileStoreError(f"{root} is a non-empty folder that is not a zarr store; refusing to write into it")


def _creation_leftovers_only(root: Path) -> bool:
    """True when `root` holds nothing but what `create_store` writes before the root
    attributes (the `slides` group metadata and the empty table, or their files set aside)."""
    from pipeline.locking import LOCK_FILES

    def own(name: str, finals: tuple[str, ...]) -> bool:
        return name in finals or any(name.startswith(f"{final}.tmp-") for final in finals)

    for entry in root.iterdir():
        if entry.name == SLIDES_GROUP and entry.is_dir():
            if not all(own(child.name, ("zarr.json",)) and child.is_file() for child in entry.iterdir()):
                return False
        elif not (entry.is_file() and (own(entry.name, (SLIDE_TABLE, "zarr.json")) or entry.name in LOCK_FILES)):
            return False
    return True


def _attrs_or_none(root: Path) -> StoreAttrs | None:
    try:
        return read_store_attrs(root)
    except NotATileStoreError:
        return None


def read_store_attrs(path: str | os.PathLike) -> StoreAttrs:
    """Root attributes of a local store; NotATileStoreError when they are absent."""
    root = Path(path)
    try:
        meta = node_metadata(root)
        return StoreAttrs.from_json(meta["attributes"][ROOT_ATTR_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        raise NotATileStoreError(
            f"{path} is not a tile store: no '{ROOT_ATTR_KEY}' root attributes "
            "(it does not exist, or its creation was interrupted)"
        ) from None


def write_slide(
    store_path: str | os.PathLike,
    slide_id: str,
    *,
    regions: Iterable[np.ndarray],
    n_regions: int,
    coords: np.ndarray,
    origin: np.ndarray,
    foreground: np.ndarray,
    attrs: dict[str, Any],
    files: dict[str, bytes] | None = None,
    build_id: str | None = None,
    background: bool = False,
) -> dict[str, Any]:
    """Write and commit one slide group; the slide is never held in memory.

    regions: iterable of `(R, R, 3) uint8` (or batches `(k, R, R, 3) uint8`), row-major
        grid order, exactly `n_regions` regions in total;
    coords: `(n, 2)` int (row, col); origin: `(n, 2)` int level-0 (x, y) px;
    foreground: `(n,)` float tissue fraction; attrs: slide group attributes
        (source_path, fingerprint, label, ..., `extra` for the manifest's other columns).
    files: extra files of the group by name (e.g. `tissue.geojson`), outside the checksums;
    build_id: commit only while the store's writer (`pipeline.locking`) has this build id,
        so a task left over from a killed build never commits into a newer build's store.
    background: codec `none`: write and hash the regions in one background thread while the
        stream produces the next ones (the file and its checksum are the same). Only for a
        stream whose arrays are never modified once yielded (each region a new array, as
        `pipeline.extract.iter_regions` yields them); at most `_MAX_PENDING` regions wait.
    Adds `slide_id`, `n_regions`, `checksums` and `checksum` to the attributes.
    Every file and folder of the group is fsynced before the commit rename.
    Returns `{"checksum": str, "checksums": {array: sha256 hex}}`.
    Raises SlideWriteError (nothing committed) when the stream has the wrong length,
    a region the wrong shape/dtype, or attrs lack source_path/fingerprint.
    """
    problem = slide_id_problem(slide_id)
    if problem is not None:
        raise SlideWriteError(problem)
    for name in files or {}:
        if name in ARRAY_NAMES or name == "zarr.json" or "/" in name or name.startswith("."):
            raise SlideWriteError(f"slide {slide_id!r}: {name!r} cannot be an extra file of the group")
    missing = [key for key in REQUIRED_SLIDE_ATTRS if key not in attrs]
    if missing:
        raise SlideWriteError(f"slide {slide_id!r}: attrs lack {missing} (the slide table is rebuilt from them)")
    root = Path(store_path)
    store_attrs = read_store_attrs(root)
    size = store_attrs.region_size
    coords, origin, foreground = _check_small_arrays(slide_id, n_regions, coords, origin, foreground)
    temp = temp_group_name(slide_id)
    group_dir = root / SLIDES_GROUP / temp
    try:
        # The group, its small arrays and (codec none) the regions' metadata are written here, not
        # through zarr (whose every call is a round trip to its event-loop thread plus existence
        # checks): the same bytes zarr writes (tests/pipeline/test_store_writer.py compares them).
        # The sharded layouts' metadata still comes from zarr.
        group_dir.mkdir()
        _write_bytes(group_dir / "zarr.json", _zarr_json(_group_metadata({})))
        for name, data in ((COORDS, coords), (ORIGIN, origin), (FOREGROUND, foreground)):
            _write_small_array(group_dir / name, data)
        chunk_key = "c/0/0/0/0"
        if store_attrs.codec["name"] == "none":
            (group_dir / REGIONS).mkdir()
            _write_bytes(group_dir / REGIONS / "zarr.json", _zarr_json(raw_regions_metadata(n_regions, size)))
        else:
            zarr.create_array(
                store=LocalStore(root), name=f"{SLIDES_GROUP}/{temp}/{REGIONS}",
                **region_array_kwargs(store_attrs.codec, n_regions=n_regions, region_size=size),
            )
        chunk_path = group_dir / REGIONS / chunk_key
        stream = _iter_regions(slide_id, regions, size)
        streamed = None
        if store_attrs.codec["name"] == "none":
            streamed = _stream_raw(slide_id, chunk_path, chunk_key, stream, n_regions, size, background=background)
        else:
            _stream_shard(slide_id, chunk_path, stream, n_regions, region_chunk_encoder(store_attrs.codec))
        checksums = {REGIONS: _local_array_checksum(group_dir / REGIONS, streamed=streamed)}
        checksums.update((name, _local_array_checksum(group_dir / name)) for name in (COORDS, ORIGIN, FOREGROUND))
        checksum = slide_checksum(checksums)
        group_attrs = {
            **attrs, "slide_id": slide_id, "n_regions": int(n_regions),
            "checksums": checksums, "checksum": checksum,
        }
        for name, data in (files or {}).items():
            _write_bytes_synced(group_dir / name, data)
        _write_json_atomic(group_dir / "zarr.json", _group_metadata(group_attrs), make_parents=False)
        fsync_tree(group_dir)
        if build_id is not None:
            _check_writer(root, slide_id, build_id)
        commit_group(root, temp, slide_id)
    except BaseException:
        shutil.rmtree(group_dir, ignore_errors=True)
        raise
    return {"checksum": checksum, "checksums": checksums}


def _check_small_arrays(
    slide_id: str, n: int, coords: np.ndarray, origin: np.ndarray, foreground: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if n < 0:
        raise SlideWriteError(f"slide {slide_id!r}: n_regions must be ≥ 0, got {n}")
    checked = []
    for name, data, shape, dtype in (
        (COORDS, coords, (n, 2), np.int32), (ORIGIN, origin, (n, 2), np.int64), (FOREGROUND, foreground, (n,), np.float32),
    ):
        array = np.asarray(data)
        if array.shape != shape:
            raise SlideWriteError(f"slide {slide_id!r}: {name} has shape {array.shape}, expected {shape}")
        if np.issubdtype(np.dtype(dtype), np.integer) and array.size:
            info = np.iinfo(dtype)
            if not np.issubdtype(array.dtype, np.integer) or array.min() < info.min or array.max() > info.max:
                raise SlideWriteError(f"slide {slide_id!r}: {name} must hold integers that fit {np.dtype(dtype)}")
        checked.append(np.ascontiguousarray(array, dtype=dtype))
    return checked[0], checked[1], checked[2]


def _write_small_array(array_dir: Path, data: np.ndarray) -> None:
    """One of a group's small arrays (`coords`, `origin`, `foreground`), as zarr would store it:
    one chunk spanning the array (at least one row long), bytes codec little endian, fill value
    0; the chunk is absent when the array is empty or all fill value (zarr's write_empty_chunks
    off, its default). Files are not synced here: `fsync_tree` syncs the group before commit."""
    array_dir.mkdir()
    _write_bytes(array_dir / "zarr.json", _zarr_json(small_array_metadata(data.shape, data.dtype)))
    chunk = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
    # zarr compares the chunk with the fill value bit for bit (-0.0 is not 0 to it, nor NaN).
    if data.size and (zarr.config.get("array.write_empty_chunks") or np.frombuffer(chunk, np.uint8).any()):
        key = "c/" + "/".join("0" for _ in data.shape)
        (array_dir / key).parent.mkdir(parents=True)
        _write_bytes(array_dir / key, chunk)


def small_array_metadata(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The `zarr.json` zarr 3 writes for a small array (see `_write_small_array`), keys in its order."""
    chunks = [max(shape[0], 1), *shape[1:]]
    return {
        "shape": list(shape),
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": np.dtype(dtype).type(0).item(),
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def raw_regions_metadata(n_regions: int, region_size: int) -> dict[str, Any]:
    """The `zarr.json` zarr 3 writes for `regions` with codec `none` (`region_array_kwargs`):
    uint8 `(n, R, R, 3)`, one chunk spanning it (at least one region long), bytes codec."""
    shape = [n_regions, region_size, region_size, 3]
    return {
        **small_array_metadata(tuple(shape), np.dtype(np.uint8)),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(n_regions, 1), *shape[1:]]}},
        "codecs": [{"name": "bytes"}],  # one-byte values: zarr records no endianness
    }


def _zarr_json(metadata: dict[str, Any]) -> bytes:
    """Metadata serialised as zarr 3 writes it (2-space indent)."""
    return json.dumps(metadata, indent=2).encode()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)


def _iter_regions(slide_id: str, regions: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Yield `(R, R, 3) uint8` C-contiguous regions, unpacking `(k, R, R, 3)` batches."""
    for item in regions:
        array = np.asarray(item)
        if array.dtype != np.uint8:
            raise SlideWriteError(f"slide {slide_id!r}: regions must be uint8, got {array.dtype}")
        if array.shape == (size, size, 3):
            yield np.ascontiguousarray(array)
        elif array.ndim == 4 and array.shape[1:] == (size, size, 3):
            for region in array:
                yield np.ascontiguousarray(region)
        else:
            raise SlideWriteError(
                f"slide {slide_id!r}: a region has shape {array.shape}, expected ({size}, {size}, 3) "
                f"(the store's region size is {size})"
            )


def _count_error(slide_id: str, got: str, expected: int) -> SlideWriteError:
    return SlideWriteError(f"slide {slide_id!r}: the region stream yielded {got} regions, expected n_regions={expected}")


def _stream_raw(
    slide_id: str, chunk_path: Path, chunk_key: str, stream: Iterator[np.ndarray], n: int, size: int,
    *, background: bool = False,
) -> ArrayHasher | None:
    """Codec `none`: the chunk file is the raw C-order `(n, R, R, 3)` array.

    Returns the chunk's checksum state (`chunk_key` and its bytes hashed as they were
    written), or None when n is 0 (no chunk file). background: see `write_slide`.
    """
    if n == 0:
        for _ in stream:
            raise _count_error(slide_id, "more than 0", 0)
        return None
    chunk_path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = n * size * size * 3
    hasher = ArrayHasher()
    hasher.begin(chunk_key, nbytes)
    count = 0
    # Unbuffered: each region (~150 KB) goes to the kernel in one write, not copied through a buffer first.
    with open(chunk_path, "wb", buffering=0) as handle, _ChunkSink(handle, hasher, background) as sink:
        for region in stream:
            if count == n:
                raise _count_error(slide_id, f"more than {n}", n)
            sink.put(memoryview(region).cast("B"))
            count += 1
        if count != n:
            raise _count_error(slide_id, str(count), n)
        sink.finish()
        fsync_file(handle)
    hasher.end()
    if chunk_path.stat().st_size != nbytes:
        raise OSError(f"{chunk_path}: wrote {chunk_path.stat().st_size} bytes, expected {nbytes}")
    return hasher


_MAX_PENDING = 32  # regions queued for the background writer (~4.8 MB at R = 224)


class _ChunkSink:
    """Appends byte blocks to an unbuffered file and hashes them, in order: in the calling
    thread, or (background) in one worker thread, so that writing and sha256 (both release the
    GIL) overlap with producing the next block. Errors surface in `put` or `finish`; leaving
    the context waits for every queued write, so the file is never closed under the worker."""

    def __init__(self, handle, hasher: ArrayHasher, background: bool):
        self._handle, self._hasher = handle, hasher
        self._writeback = EarlyWriteback(handle.fileno())
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="chunk-write") if background else None
        self._pending: deque[Future] = deque()

    def _write(self, data: memoryview) -> None:
        _write_all(self._handle, data)
        self._writeback.written(data.nbytes)
        self._hasher.update(data)

    def put(self, data: memoryview) -> None:
        """Queue (or write) one block; blocks while `_MAX_PENDING` are queued."""
        if self._pool is None:
            self._write(data)
            return
        self._pending.append(self._pool.submit(self._write, data))
        while len(self._pending) > _MAX_PENDING or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()

    def finish(self) -> None:
        """Wait for every queued block; raises the first write error."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "_ChunkSink":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        if exc[0] is None:
            self.finish()


def _write_all(handle, data: memoryview) -> None:
    """Write all of `data` to an unbuffered file (a raw write may take only part of it)."""
    while data:
        data = data[handle.write(data):]


def _stream_shard(slide_id: str, shard_path: Path, stream: Iterator[np.ndarray], n: int, encode) -> None:
    """`zstd`/`jpeg`: one shard holding n inner chunks `(1, R, R, 3)`, then the index
    (n × (offset, nbytes) little-endian uint64) and its crc32c, as zarr's sharding codec reads it."""
    if n == 0:
        for _ in stream:
            raise _count_error(slide_id, "more than 0", 0)
        return
    shard_path.parent.mkdir(parents=True, exist_ok=True)
    index = np.full((n, 2), _NO_CHUNK, dtype="<u8")
    offset = count = 0
    with open(shard_path, "wb", buffering=_WRITE_BUFFER) as handle:
        for region in stream:
            if count == n:
                raise _count_error(slide_id, f"more than {n}", n)
            data = encode(region)
            handle.write(data)
            index[count] = (offset, len(data))
            offset += len(data)
            count += 1
        if count != n:
            raise _count_error(slide_id, str(count), n)
        index_bytes = index.tobytes()
        handle.write(index_bytes)
        handle.write(np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes())
        fsync_file(handle)


def _local_array_checksum(array_dir: Path, *, streamed: ArrayHasher | None = None) -> str:
    """Checksum of a local array from its stored files; `streamed`: its first stored key
    already hashed while it was written (that file is not read again)."""
    metadata = node_metadata(array_dir)
    if streamed is not None and streamed.last_key != array_keys(metadata)[0]:
        raise RuntimeError(f"{array_dir}: streamed key {streamed.last_key!r} is not the array's first key")

    def read(key: str):
        path = array_dir / key
        if not path.is_file():
            return None
        return path.stat().st_size, _file_blocks(path)

    return array_checksum(metadata, read, hasher=streamed)


def _file_blocks(path: Path, block: int = 4 << 20) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while data := handle.read(block):
            yield data


def write_group_metadata(group_dir: Path, attributes: dict[str, Any]) -> None:
    """Write a group's `zarr.json` (atomically, synced) into the existing folder `group_dir`."""
    _write_json_atomic(Path(group_dir) / "zarr.json", _group_metadata(attributes), make_parents=False)


def _group_metadata(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


def _check_writer(root: Path, slide_id: str, build_id: str) -> None:
    from pipeline.locking import current_build_id

    current = current_build_id(root)
    if current != build_id:
        raise SlideWriteError(
            f"slide {slide_id!r}: not committed, the build that started this task no longer holds {root} "
            f"(its writer is now {current or 'none'}); the slide is redone by the current build"
        )


def _write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:  # the group folder must exist: never recreate a removed one
        handle.write(data)
        fsync_file(handle)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (itself included), files first, so that
    after a power loss a committed group never holds empty or missing files."""
    for current, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            fd = os.open(os.path.join(current, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(current, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any], *, make_parents: bool = True) -> None:
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} disappeared while it was being written")
    try:  # fast path: plain values, numpy scalars/arrays through `default`
        text = json.dumps(data, allow_nan=False, separators=(",", ":"), default=_json_default)
    except ValueError:  # a non-finite float somewhere: store it as null
        text = json.dumps(_jsonable(data), allow_nan=False, separators=(",", ":"))
    aside = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(aside, "w", encoding="utf-8") as handle:
        handle.write(text)
        fsync_file(handle)
    os.replace(aside, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} is not JSON serialisable")


def _jsonable(value: Any) -> Any:
    """Plain-JSON copy of attribute values (numpy scalars/arrays, tuples, paths)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


__all__ = ["check_store_folder", "create_store", "fsync_tree", "read_store_attrs", "write_group_metadata", "write_slide"]
