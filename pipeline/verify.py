"""`pm-tiles verify STORE`: check every slide of a store, streamed, and report all problems.

Per slide in the table: the group and every array exist; shapes and dtypes are the
format's (`regions (n, R, R, 3) uint8`, `coords (n, 2) int32`, `origin (n, 2) int64`,
`foreground (n,) float32`, n the table's count); each array's stored keys hash to the
checksums recorded at write time (streamed in 4 MiB blocks) and the slide checksum to
the table's; compressed regions decode (`batch` regions at a time). Memory stays
bounded by one block plus one batch, whatever the slide size. Works on any store
`open_store` opens (local, http://, s3://).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.schema.checksums import slide_checksum
from pipeline.schema.errors import TileStoreError
from pipeline.schema.format import ARRAY_NAMES, COORDS, FOREGROUND, ORIGIN, REGIONS
from pipeline.schema.reader import TileStore, open_store

DECODE_BATCH = 64


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """problems: slide id → what is wrong (every bad slide, not only the first);
    bytes_read: stored bytes hashed; seconds: wall time."""

    url: str
    n_slides: int
    problems: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        rate = self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0
        head = (f"verified {self.n_slides} slides of {self.url}: {len(self.problems)} corrupt or missing; "
                f"{self.bytes_read / 1e6:.1f} MB read in {self.seconds:.1f} s ({rate:.0f} MB/s)")
        lines = [head] + [f"  BAD {slide_id}: {why}" for slide_id, why in sorted(self.problems.items())]
        if self.problems:
            lines.append("  `pm-tiles build --repair` with the store's manifest redoes exactly these slides")
        return "\n".join(lines)


def _expected_layout(store: TileStore, n: int) -> dict[str, tuple[tuple[int, ...], str]]:
    size = store.attrs.region_size
    return {
        REGIONS: ((n, size, size, 3), "uint8"),
        COORDS: ((n, 2), "int32"),
        ORIGIN: ((n, 2), "int64"),
        FOREGROUND: ((n,), "float32"),
    }


def slide_problem(store: TileStore, slide_id: str, *, on_block=None, batch: int = DECODE_BATCH) -> str | None:
    """What is wrong with one slide of the table, or None when it is intact."""
    record = store.records[slide_id]
    try:
        attrs = store.slide_attrs(slide_id)
    except TileStoreError as error:
        return str(error)
    recorded = attrs.get("checksums") or {}
    layout = _expected_layout(store, record.n_regions)
    computed: dict[str, str] = {}
    for name in ARRAY_NAMES:
        metadata = store.array_metadata(slide_id, name)
        if metadata is None:
            return f"array {name!r} is missing"
        shape, dtype = layout[name]
        if tuple(metadata.get("shape", ())) != shape or metadata.get("data_type") != dtype:
            return (f"array {name!r} is {metadata.get('data_type')} {tuple(metadata.get('shape', ()))}, "
                    f"expected {dtype} {shape}")
        computed[name] = store.stored_array_checksum(slide_id, name, metadata, on_block=on_block)
        if recorded.get(name) != computed[name]:
            return f"array {name!r} does not match its recorded checksum (stored bytes or metadata changed)"
    if slide_checksum(computed) != record.checksum:
        return "its content checksum differs from the slide table's"
    try:
        _decode_all(store, slide_id, record.n_regions, batch)
    except Exception as error:  # noqa: BLE001 — any decoding error makes the slide bad
        return f"does not decode ({type(error).__name__}: {error})"
    return None


def _decode_all(store: TileStore, slide_id: str, n: int, batch: int) -> None:
    arrays = store.read_slide(slide_id, whole=False)  # bounded memory: decoded `batch` regions at a time
    regions = arrays.regions
    if isinstance(regions, np.ndarray):  # raw memmap: its bytes were just hashed, nothing to decode
        return
    for start in range(0, n, batch):
        block = regions[start:start + batch]
        if block.shape[0] != min(batch, n - start):
            raise ValueError(f"regions {start}..{start + batch} decoded to {block.shape[0]} regions")


def verify_store(url: Any, *, storage_options: dict[str, Any] | None = None, slide_ids: Iterable[str] | None = None,
                 progress: bool = False, batch: int = DECODE_BATCH) -> VerifyReport:
    """Check every slide in the table (or `slide_ids`); raises only when the store itself
    cannot be opened (NotATileStoreError, UnsupportedFormatError, MissingCodecError)."""
    started = time.perf_counter()
    store = open_store(url, storage_options=storage_options)
    ids = sorted(store.records) if slide_ids is None else [i for i in slide_ids if i in store.records]
    counted = [0]

    def count(nbytes: int) -> None:
        counted[0] += nbytes

    problems: dict[str, str] = {}
    for slide_id in tqdm(ids, unit="slide", desc="verifying", disable=not progress):
        try:
            problem = slide_problem(store, slide_id, on_block=count, batch=batch)
        except (OSError, ValueError, TileStoreError) as error:
            problem = f"{type(error).__name__}: {error}"
        if problem is not None:
            problems[slide_id] = problem
    return VerifyReport(url=store.url, n_slides=len(ids), problems=problems, bytes_read=counted[0],
                        seconds=time.perf_counter() - started)


__all__ = ["VerifyReport", "slide_problem", "verify_store"]
