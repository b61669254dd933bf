"""The Dask driver: one task per slide, the slide table updated after each (DESIGN.md §5).

Workers write and commit slide groups (`pipeline.process.process_slide`); the driver
alone rewrites `slides.json`, atomically, after every finished task, so a kill at any
moment loses at most the table update of slides already renamed into place, which the
next run's `reconcile` restores.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import pipeline
from pipeline.manifest import ManifestRow, load_manifest
from pipeline.process import ProcessSettings, SlideResult, process_slide
from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import reconcile, temp_group_name, write_table
from pipeline.schema.errors import TileStoreError
from pipeline.schema.format import SLIDES_GROUP, FailureRecord, SlideRecord, StoreAttrs, mpp_for_magnification
from pipeline.slide import source_fingerprint
from pipeline.store_writer import create_store
from pipeline.tissue import TissueSettings

LOCK_FILE = ".build.lock"  # at the store root; held (flock) for a whole build


@dataclass(frozen=True, kw_only=True)
class BuildSummary:
    """Outcome of a build: slide ids written now, skipped (complete, unchanged) and failed."""

    store_path: str
    total: int
    written: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    failures: tuple[FailureRecord, ...] = ()
    n_regions: int = 0
    seconds: float = 0.0
    reconciled: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        """Human-readable summary, failures listed with their reasons."""
        lines = [
            f"tile store {self.store_path}: {self.total} slides in the manifest; "
            f"{len(self.written)} written ({self.n_regions} regions), {len(self.skipped)} already complete, "
            f"{len(self.failures)} failed, in {self.seconds:.1f} s",
        ]
        for kind, ids in self.reconciled.items():
            if ids:
                lines.append(f"  reconciled ({kind}): {', '.join(ids)}")
        for failure in self.failures:
            lines.append(f"  FAILED {failure.slide_id} ({failure.source_path}): {failure.reason}")
        return "\n".join(lines)


def slide_task(row: ManifestRow, store_path: str, settings: ProcessSettings, known_fingerprint: str | None) -> SlideResult | None:
    """One Dask task: None when the slide is complete and must be kept (skip), else
    `process_slide`'s result (which never raises).

    A complete slide is kept when its source still has the recorded fingerprint, and also
    when the source cannot be opened now (a permission or network hiccup, a file being
    copied): redoing it would fail and lose the complete slide (DESIGN.md §8). Only a
    source that opens with another fingerprint is re-tiled.
    """
    if known_fingerprint is not None:
        current = _fingerprint_or_none(row.path, known_fingerprint.startswith("quickhash-1:"))
        if current is None or current == known_fingerprint:
            return None
    return process_slide(row, store_path, settings)


def _fingerprint_or_none(path: str, quickhash: bool) -> str | None:
    try:
        return source_fingerprint(path, require_quickhash=quickhash)
    except Exception:  # noqa: BLE001 — process_slide reports the specific reason
        return None


def build_store(
    manifest_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    magnification: float,
    codec: str = "none",
    codec_options: dict[str, Any] | None = None,
    min_foreground: float = 0.5,
    region_size: int = 224,
    tissue: TissueSettings | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    progress: bool = True,
    reader: str = "auto",
    scaled_decode: bool = False,
) -> BuildSummary:
    """Build (or resume) the tile store `out` from a manifest.

    magnification: 2.5, 5, 10 or 20 (target µm/px 4, 2, 1, 0.5); region_size: R in px;
    min_foreground: least tissue fraction of a kept region; workers: local Dask worker
    processes (0 runs every slide in this process, in order); scheduler: address of an
    existing Dask scheduler (overrides workers; its workers need this package installed);
    a local build of one slide runs in this process (a cluster's start costs more than it
    saves). reader: "auto" | "direct" | "openslide" (`pipeline.readers`; recorded per slide,
    not a store setting); scaled_decode: DCT-domain scaled JPEG decoding (inexact; a store setting).
    Raises ManifestError (every bad row) before any work, StoreMismatchError when `out`
    holds a store with other settings. Slide failures do not raise: see the summary.
    """
    started = time.perf_counter()
    if region_size < 1:
        raise ValueError(f"region size must be ≥ 1 px, got {region_size}")
    if not 0.0 <= min_foreground <= 1.0:
        raise ValueError(f"min foreground must be in [0, 1], got {min_foreground}")
    if workers < 0:
        raise ValueError(f"workers must be ≥ 0, got {workers}")
    rows = load_manifest(manifest_path)
    tissue = tissue or TissueSettings()
    target_mpp = mpp_for_magnification(magnification)
    codec_attr = codec_settings(codec, **(codec_options or {}))
    store_path = os.path.abspath(out)  # workers of a --scheduler cluster resolve paths on their own
    create_store(store_path, StoreAttrs(
        magnification=float(magnification), mpp=target_mpp, region_size=int(region_size),
        min_foreground=float(min_foreground), codec=codec_attr, segmentation=tissue.to_json(),
        pipeline_version=pipeline.__version__, decode={"dct_scaled": bool(scaled_decode)},
    ))
    settings = ProcessSettings(
        target_mpp=target_mpp, region_size=int(region_size), min_foreground=float(min_foreground),
        codec=codec, codec_settings={k: v for k, v in codec_attr.items() if k not in ("name", "zarr_codec")},
        tissue=tissue, reader=reader, scaled_decode=bool(scaled_decode),
    )
    if scheduler is None:
        # Starting a local cluster takes seconds: more than a one-slide build can gain from it.
        workers = 0 if len(rows) <= 1 else min(workers, len(rows))
        # Cores the worker processes leave idle decode tiles in threads (direct reader).
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
        settings = dataclasses.replace(settings, decode_threads=threads)
    with _build_lock(store_path):
        summary = _run(rows, store_path, settings, workers=workers, scheduler=scheduler, progress=progress)
    return dataclasses.replace(summary, seconds=time.perf_counter() - started)


def _run(rows: list[ManifestRow], store_path: str, settings: ProcessSettings, *, workers: int,
         scheduler: str | None, progress: bool) -> BuildSummary:
    """Reconcile, run one task per slide, rewrite the table after each; the summary's
    `seconds` is left for the caller."""
    table, report = reconcile(store_path)
    written: list[str] = []
    skipped: list[str] = []
    failures: dict[str, FailureRecord] = {}
    n_regions = 0
    bar = tqdm(total=len(rows), unit="slide", desc="tiling", disable=not progress)
    try:
        with _executor(workers, scheduler) as run_all:
            tasks = [
                (row, store_path, settings, table.slides[row.slide_id].fingerprint if row.slide_id in table.slides else None)
                for row in rows
            ]
            for row, result in run_all(tasks):
                if result is None:
                    skipped.append(row.slide_id)
                    relabelled = _with_manifest_fields(table.slides[row.slide_id], row)
                    if relabelled != table.slides[row.slide_id]:
                        table = table.with_slide(relabelled)
                        write_table(store_path, table)
                elif result.ok and result.record is not None:
                    table = table.with_slide(result.record)
                    failures.pop(row.slide_id, None)
                    written.append(row.slide_id)
                    n_regions += result.n_regions
                else:
                    failure = result.failure or FailureRecord(
                        slide_id=row.slide_id, source_path=row.path, reason="the task returned no record",
                        error_type="RuntimeError",
                    )
                    _remove_stale_group(store_path, row.slide_id)
                    table = table.with_failure(failure)
                    failures[row.slide_id] = failure
                if result is not None:
                    write_table(store_path, table)
                bar.update(1)
                bar.set_postfix(failed=len(failures), refresh=False)
    finally:
        bar.close()
    return BuildSummary(
        store_path=store_path, total=len(rows), written=tuple(written), skipped=tuple(skipped),
        failures=tuple(failures.values()), n_regions=n_regions,
        reconciled={"added": report.added, "refreshed": report.refreshed, "dropped": report.dropped},
    )


@contextmanager
def _build_lock(store_path: str) -> Iterator[None]:
    """Hold an exclusive lock on the store for the whole build: a second build on the same
    store would remove the first one's temporary groups when it reconciles. The OS drops
    the lock when the process dies, even by kill -9."""
    import fcntl

    with open(Path(store_path) / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TileStoreError(f"another `pm-tiles build` is writing {store_path}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _with_manifest_fields(record: SlideRecord, row: ManifestRow) -> SlideRecord:
    """A complete slide's table row with the manifest's current label/split/case/extra
    columns (editing labels needs no re-tiling; the table is what readers trust)."""
    return dataclasses.replace(
        record, label=row.label, split=row.split, case_id=row.case_id, extra=dict(row.extra), source_path=row.path,
    )


def _remove_stale_group(store_path: str, slide_id: str) -> None:
    """A slide that failed keeps no visible group (else reconcile would bring it back)."""
    group = Path(store_path) / SLIDES_GROUP / slide_id
    if group.exists():
        aside = group.with_name(temp_group_name(slide_id))
        os.rename(group, aside)
        shutil.rmtree(aside, ignore_errors=True)


Task = tuple[ManifestRow, str, ProcessSettings, "str | None"]
Runner = Callable[[list[Task]], Iterator[tuple[ManifestRow, "SlideResult | None"]]]


@contextmanager
def _executor(workers: int, scheduler: str | None) -> Iterator[Runner]:
    """A function running tasks and yielding (row, result) as they finish: in this
    process (workers 0), on a local cluster of worker processes, or on `scheduler`."""
    if scheduler is None and workers == 0:
        yield lambda tasks: ((task[0], slide_task(*task)) for task in tasks)
        return
    from distributed import Client, LocalCluster, as_completed

    if scheduler is not None:
        cluster, client = None, Client(scheduler)
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=40,
        )
        client = Client(cluster)
    try:
        def run(tasks: list[Task]) -> Iterator[tuple[ManifestRow, SlideResult | None]]:
            futures = {}
            for task in tasks:
                future = client.submit(slide_task, *task, key=f"slide-{task[0].slide_id}-{uuid.uuid4().hex}", pure=False)
                futures[future] = task[0]
            try:
                for future in as_completed(futures):
                    row = futures[future]
                    try:
                        yield row, future.result()
                    except Exception as error:  # noqa: BLE001 — a worker died or the task could not run
                        yield row, _lost_task(row, error)
            finally:
                client.cancel(list(futures))

        yield run
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _lost_task(row: ManifestRow, error: BaseException) -> SlideResult:
    failure = FailureRecord(
        slide_id=row.slide_id, source_path=row.path,
        reason=f"the Dask task failed ({type(error).__name__}: {error}); the worker may have run out of memory",
        error_type=type(error).__name__,
    )
    return SlideResult(slide_id=row.slide_id, ok=False, record=None, failure=failure, seconds=0.0, n_regions=0)
