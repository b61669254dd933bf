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
from collections.abc import Callable, Iterable, Mapping
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


def array_checksum(metadata: Mapping[str, Any], read: KeyReader) -> str:
    """sha256 hex of the array's stored keys (see module docstring)."""
    digest = hashlib.sha256()
    for key in array_keys(metadata):
        found = read(key)
        if found is None:
            continue
        size, blocks = found
        digest.update(f"{key}\0{size}\0".encode())
        seen = 0
        for block in blocks:
            digest.update(block)
            seen += len(block)
        if seen != size:
            raise OSError(f"{key}: read {seen} bytes, expected {size}")
    return digest.hexdigest()


def slide_checksum(checksums: Mapping[str, str]) -> str:
    """sha256 hex over the per-array checksums, in `ARRAY_NAMES` order."""
    digest = hashlib.sha256()
    for name in ARRAY_NAMES:
        digest.update(f"{name}:{checksums[name]}\n".encode())
    return digest.hexdigest()
