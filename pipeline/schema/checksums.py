"""Content checksums of a slide group (DESIGN.md §5): sha256 over each array's stored files.

An array's checksum hashes, in key order, every stored key of the array (its
`zarr.json` and each chunk/shard file that exists) as `key NUL size NUL bytes`.
Keys come from the array metadata, not from listing a directory, so a reader over
HTTP can verify what a local writer recorded. The slide checksum hashes the per-array
checksums in `ARRAY_NAMES` order.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.schema.format import ARRAY_NAMES

# Reads a key relative to the array; returns (size, iterable of byte blocks) or None if absent.
KeyReader = Callable[[str], "tuple[int, Iterable[bytes]] | None"]


def array_keys(metadata: Mapping[str, Any]) -> list[str]:
    """All keys an array can store, sorted: `zarr.json` and its chunk (or shard) keys.

    metadata: the array's `zarr.json` (regular chunk grid, default "/" chunk keys).
    """
    shape = metadata["shape"]
    outer = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = metadata.get("chunk_key_encoding", {"name": "default"})
    separator = (encoding.get("configuration") or {}).get("separator", "/")
    if encoding.get("name", "default") != "default":
        raise ValueError(f"unsupported chunk key encoding {encoding!r}")
    counts = [math.ceil(s / c) if s else 0 for s, c in zip(shape, outer, strict=True)]
    chunk_keys = [
        "c" + separator + separator.join(str(i) for i in index)
        for index in itertools.product(*(range(n) for n in counts))
    ] if shape else ["c"]
    return sorted(["zarr.json", *chunk_keys])


class ArrayHasher:
    """`array_checksum` fed piece by piece: `begin(key, size)`, the key's bytes through
    `update`, `end()`, for each stored key in `array_keys` order; then `hexdigest()`.

    A writer uses it to hash a file's bytes while it streams them, instead of reading
    the file back; `array_checksum(..., hasher=)` then hashes the keys that follow.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.last_key: str | None = None  # the last key begun
        self._size = self._seen = 0
        self._open = False

    def begin(self, key: str, size: int) -> None:
        if self._open:
            raise RuntimeError(f"key {self.last_key!r} was begun but not ended")
        if self.last_key is not None and key <= self.last_key:
            raise ValueError(f"key {key!r} comes after {self.last_key!r}: keys must be fed in sorted order")
        self._digest.update(f"{key}\0{size}\0".encode())
        self.last_key, self._size, self._seen, self._open = key, size, 0, True

    def update(self, block: bytes | memoryview) -> None:
        """Bytes of the key begun last (a bytes-like object, counted by its `nbytes`)."""
        self._digest.update(block)
        self._seen += block.nbytes if isinstance(block, memoryview) else len(block)

    def end(self) -> None:
        if self._seen != self._size:
            raise OSError(f"{self.last_key}: read {self._seen} bytes, expected {self._size}")
        self._open = False

    def hexdigest(self) -> str:
        if self._open:
            raise RuntimeError(f"key {self.last_key!r} was begun but not ended")
        return self._digest.hexdigest()


def array_checksum(metadata: Mapping[str, Any], read: KeyReader, *, hasher: ArrayHasher | None = None) -> str:
    """sha256 hex of the array's stored keys (see module docstring).

    hasher: one already fed the array's first stored key(s) (a writer hashing while it
        streams); keys up to and including its `last_key` are not read again.
    """
    hasher = ArrayHasher() if hasher is None else hasher
    for key in array_keys(metadata):
        if hasher.last_key is not None and key <= hasher.last_key:
            continue
        found = read(key)
        if found is None:
            continue
        size, blocks = found
        hasher.begin(key, size)
        for block in blocks:
            hasher.update(block)
        hasher.end()
    return hasher.hexdigest()


def slide_checksum(checksums: Mapping[str, str]) -> str:
    """sha256 hex over the per-array checksums, in `ARRAY_NAMES` order."""
    digest = hashlib.sha256()
    for name in ARRAY_NAMES:
        digest.update(f"{name}:{checksums[name]}\n".encode())
    return digest.hexdigest()
