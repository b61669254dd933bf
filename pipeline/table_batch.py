"""The driver's slide table, written in batches instead of once per slide (DESIGN.md §5).

Rewriting `slides.json` after every slide costs O(table) per slide: a 10k-slide build
wrote ~25 GB of table and serialised on it. `BatchedTable` keeps the table in memory
(mutable dicts, O(1) per slide) and writes it atomically every `every` changes or
`seconds` seconds, and at the end. A crash loses at most the last batch's table rows;
their groups are committed on disk, so the next run's `reconcile` adds them back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pipeline.schema.commit import SlideTable, write_table
from pipeline.schema.format import FailureRecord, SlideRecord


@dataclass(frozen=True, kw_only=True)
class TableBatch:
    """When the driver writes the slide table: after `every` changed slides or `seconds`
    seconds since the last write, whichever comes first (and always at the end).
    every=1 is the old per-slide rewrite."""

    every: int = 100
    seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"table batch size must be ≥ 1, got {self.every}")
        if self.seconds < 0:
            raise ValueError(f"table batch interval must be ≥ 0 s, got {self.seconds}")


class BatchedTable:
    """A slide table being updated by one driver; `flush()` writes it if anything changed."""

    def __init__(self, store_path: str | os.PathLike, table: SlideTable, batch: TableBatch = TableBatch()) -> None:
        self.store_path = store_path
        self.batch = batch
        self.slides: dict[str, SlideRecord] = dict(table.slides)
        self.failures: dict[str, FailureRecord] = dict(table.failures)
        self.writes = 0
        self._pending = 0
        self._last_write = time.monotonic()

    def put_slide(self, record: SlideRecord) -> None:
        """A complete slide (re)placed; a former failure of the same id is dropped."""
        self.slides[record.slide_id] = record
        self.failures.pop(record.slide_id, None)
        self._changed()

    def put_failure(self, failure: FailureRecord) -> None:
        """A failed slide recorded; a stale complete entry of the same id is dropped."""
        self.slides.pop(failure.slide_id, None)
        self.failures[failure.slide_id] = failure
        self._changed()

    def remove(self, slide_id: str) -> None:
        """A slide dropped from the table altogether (pruned)."""
        if self.slides.pop(slide_id, None) is not None or self.failures.pop(slide_id, None) is not None:
            self._changed()

    def snapshot(self) -> SlideTable:
        return SlideTable(slides=dict(self.slides), failures=dict(self.failures))

    def _changed(self) -> None:
        self._pending += 1
        if self._pending >= self.batch.every or time.monotonic() - self._last_write >= self.batch.seconds:
            self.flush()

    def flush(self) -> None:
        """Write the table now (atomically) when it has unwritten changes."""
        if not self._pending:
            return
        write_table(self.store_path, self.snapshot())
        self.writes += 1
        self._pending = 0
        self._last_write = time.monotonic()
