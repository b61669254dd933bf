"""Benchmark: the driver's per-slide cost of keeping the slide table, with 10k entries.

Before (the old driver): after each finished slide, `table.with_slide(record)` (a copy of
the table) and a full atomic rewrite of `slides.json`. After: `BatchedTable.put_slide`
(O(1)) with the table written every `TableBatch.every` slides or `seconds` seconds.
Both add `--slides` records to a table that already holds `--entries` synthetic rows
shaped like real ones (manifest extras included), in a temporary store on local disk.

    python bench/driver_overhead.py                   # 10,000 entries, 200 slides
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.schema.commit import SlideTable, write_table
from pipeline.schema.format import SlideRecord
from pipeline.table_batch import BatchedTable, TableBatch


def record(i: int) -> SlideRecord:
    return SlideRecord(
        slide_id=f"TCGA-{i:06d}-01Z-00-DX1", n_regions=300 + i % 700, label=f"class{i % 5}", split="train",
        case_id=f"case-{i // 2:06d}", source_path=f"/nfs/cohort/slides/TCGA-{i:06d}-01Z-00-DX1.svs",
        fingerprint=f"quickhash-1:{i:064x}", checksum=f"{i * 7919:064x}", mpp_source="openslide.mpp-x/y",
        grid_shape=(120, 160), extra={"site": f"site{i % 40}", "scanner": "AT2", "stain_batch": str(i % 13)},
        manifest_mpp=None, tissue_geojson_sha256=None,
    )


def old_write_table(root: Path, table: SlideTable) -> None:
    """The table write as the driver did it before batching: asdict rows, indent=1, json.dump."""
    aside = root / f"slides.json.tmp-{uuid.uuid4().hex}"
    data = {"format_version": "1.0",
            "slides": [{**dataclasses.asdict(table.slides[k]), "grid_shape": list(table.slides[k].grid_shape)}
                       for k in sorted(table.slides)],
            "failures": [dataclasses.asdict(table.failures[k]) for k in sorted(table.failures)]}
    with open(aside, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(aside, root / "slides.json")


def before(root: Path, entries: int, slides: int) -> float:
    table = SlideTable(slides={r.slide_id: r for r in map(record, range(entries))})
    old_write_table(root, table)
    started = time.perf_counter()
    for i in range(entries, entries + slides):
        table = table.with_slide(record(i))
        old_write_table(root, table)
    return (time.perf_counter() - started) / slides


def after(root: Path, entries: int, slides: int, batch: TableBatch) -> tuple[float, int]:
    table = SlideTable(slides={r.slide_id: r for r in map(record, range(entries))})
    write_table(root, table)
    batched = BatchedTable(root, table, batch)
    started = time.perf_counter()
    for i in range(entries, entries + slides):
        batched.put_slide(record(i))
    batched.flush()
    return (time.perf_counter() - started) / slides, batched.writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--slides", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        old = before(root, args.entries, args.slides)
        table_bytes = (root / "slides.json").stat().st_size
        single = time.perf_counter()
        write_table(root, SlideTable(slides={r.slide_id: r for r in map(record, range(args.entries))}))
        single = time.perf_counter() - single
        new, writes = after(root, args.entries, args.slides, TableBatch())
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"{args.entries} table entries ({table_bytes / 1e6:.1f} MB slides.json), {args.slides} slides added")
    print("| table update | ms per slide | table writes | vs before |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| before: copy + rewrite per slide | {old * 1e3:.2f} | {args.slides} | 1.00× |")
    print(f"| after: BatchedTable (every {TableBatch().every} / {TableBatch().seconds:g} s) | {new * 1e3:.3f} | "
          f"{writes} | {old / new:.0f}× faster |")
    print(f"one write of the {args.entries}-entry table now: {single * 1e3:.0f} ms")
    print(f"extrapolated to a 10k-slide build: before ≈ {old * 10_000 / 60:.0f} min of table work "
          f"(~{table_bytes * 10_000 / 2 / 1e9:.0f} GB written), after ≈ {new * 10_000:.0f} s")


if __name__ == "__main__":
    main()
