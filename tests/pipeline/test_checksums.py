"""The content checksum's definition itself (pipeline/schema/checksums.py), pinned by value.

The expected digests were computed once from the documented definition (sha256 over
`key NUL size NUL bytes` for each stored key in sorted order; the slide checksum over
`name:checksum\n` in ARRAY_NAMES order), so a change to the definition fails here even
when writer and reader change together.
"""

from __future__ import annotations

import json

from pipeline.schema.checksums import ArrayHasher, array_checksum, array_keys, slide_checksum

METADATA = b'{"shape":[3],"chunk_grid":{"name":"regular","configuration":{"chunk_shape":[2]}}}'
FILES = {"c/0": bytes([1, 2]), "c/1": bytes([3, 0]), "zarr.json": METADATA}
ARRAY_DIGEST = "64dc8b865ea4096cef01f05584db7cb94a92f0b45fd4ee5decedcde4b5f2dd8e"
SLIDE_DIGEST = "bcfd797daba563a6dd5d2a337175270c5d59c399a40d95dd34da86f7248136d2"


def _read(key: str):
    data = FILES.get(key)
    return None if data is None else (len(data), [data[:1], data[1:]])  # blocks split on purpose


def test_array_checksum_has_the_documented_value():
    metadata = json.loads(METADATA)
    assert array_keys(metadata) == ["c/0", "c/1", "zarr.json"]
    assert array_checksum(metadata, _read) == ARRAY_DIGEST


def test_streamed_hasher_gives_the_same_value():
    hasher = ArrayHasher()
    hasher.begin("c/0", 2)
    hasher.update(memoryview(bytes([1, 2])))
    hasher.end()
    assert array_checksum(json.loads(METADATA), _read, hasher=hasher) == ARRAY_DIGEST


def test_slide_checksum_has_the_documented_value():
    names = ("regions", "coords", "origin", "foreground")
    assert slide_checksum({name: ARRAY_DIGEST for name in names}) == SLIDE_DIGEST


def test_a_missing_chunk_changes_the_checksum():
    def without_c1(key: str):
        return None if key == "c/1" else _read(key)

    assert array_checksum(json.loads(METADATA), without_c1) != ARRAY_DIGEST
