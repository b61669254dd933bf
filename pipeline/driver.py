"""The Dask driver: one task per slide, the slide table written in batches (DESIGN.md §5).

Workers write and commit slide groups (`pipeline.process.process_slide`); the driver
alone writes `slides.json`, atomically, every `TableBatch` slides or seconds and at the
end (`pipeline.table_batch`), so a kill at any moment loses at most the table rows of
slides already renamed into place, which the next run's `reconcile` restores.

The store is created only once its build lock is held (`pipeline.locking`), and every
task carries the build's id: a task left running by a killed driver cannot commit into
the store a restarted build holds.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import pipeline
from pipeline.build_summary import BuildSummary, SlideStatus, write_status_csv
from pipeline.locking import build_lock
from pipeline.manifest import ManifestRow, load_manifest
from pipeline.process import ProcessSettings, SlideResult, file_sha256, process_slide
from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import reconcile, temp_group_name
from pipeline.schema.errors import NotATileStoreError
from pipeline.schema.format import (
    MAGNIFICATION_TO_MPP,
    SLIDES_GROUP,
    FailureRecord,
    SlideRecord,
    StoreAttrs,
    magnification_for_mpp,
    mpp_for_magnification,
)
from pipeline.slide import source_fingerprint
from pipeline.store_writer import check_store_folder, create_store, read_store_attrs
from pipeline.table_batch import BatchedTable, TableBatch
from pipeline.tissue import TissueSettings

__all__ = ["BuildSummary", "SlideStatus", "TableBatch", "build_store", "slide_task"]

DEFAULTS = {"codec": "none", "region_size": 224, "min_foreground": 0.5}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkipKey:
    """What a complete slide was tiled from, besides the store's settings: the source's
    fingerprint, the manifest's mpp override and the sha256 of its tissue GeoJSON.
    A slide is re-tiled when any of them changed."""

    fingerprint: str
    manifest_mpp: float | None
    tissue_geojson_sha256: str | None

    @classmethod
    def of(cls, record: SlideRecord) -> "SkipKey":
        return cls(fingerprint=record.fingerprint, manifest_mpp=record.manifest_mpp,
                   tissue_geojson_sha256=record.tissue_geojson_sha256)


def slide_task(row: ManifestRow, store_path: str, settings: ProcessSettings, known: SkipKey | None) -> SlideResult | None:
    """One Dask task: None when the slide is complete and must be kept (skip), else
    `process_slide`'s result (which never raises).

    A complete slide is re-tiled when the manifest's mpp or tissue GeoJSON changed, or
    its source opens with another fingerprint. It is kept when the source cannot be
    opened now (a permission or network hiccup, a file being copied): redoing it would
    fail and lose the complete slide (DESIGN.md §8).
    """
    if known is not None and _manifest_inputs_unchanged(row, known):
        current = _fingerprint_or_none(row.path, known.fingerprint.startswith("quickhash-1:"))
        if current is None or current == known.fingerprint:
            return None
    return process_slide(row, store_path, settings)


def _manifest_inputs_unchanged(row: ManifestRow, known: SkipKey) -> bool:
    if row.mpp != known.manifest_mpp:
        return False
    if row.tissue_geojson is None:
        return known.tissue_geojson_sha256 is None
    try:
        return file_sha256(row.tissue_geojson) == known.tissue_geojson_sha256
    except OSError:
        return True  # unreadable now: keep the complete slide, as for an unreadable source


def _fingerprint_or_none(path: str, quickhash: bool) -> str | None:
    try:
        return source_fingerprint(path, require_quickhash=quickhash)
    except Exception:  # noqa: BLE001 — process_slide reports the specific reason
        return None


def resolve_store_attrs(
    existing: StoreAttrs | None, *, magnification: float | None, mpp: float | None, codec: str | None,
    codec_options: dict[str, Any] | None, min_foreground: float | None, region_size: int | None,
    tissue: TissueSettings | None, scaled_decode: bool | None = None,
) -> StoreAttrs:
    """The store's settings for this build: each one given, else the existing store's,
    else the default. (A mismatch with the existing store is `create_store`'s to report.)"""
    if magnification is not None and mpp is not None:
        raise ValueError("give either a magnification or a target mpp, not both")
    if mpp is not None:
        target_mpp, magnification = float(mpp), magnification_for_mpp(mpp)
    elif magnification is not None:
        target_mpp = mpp_for_magnification(magnification)
    elif existing is not None:
        target_mpp, magnification = existing.mpp, existing.magnification
    else:
        named = ", ".join(f"{m:g}" for m in MAGNIFICATION_TO_MPP)
        raise ValueError(f"the store does not exist yet: give a magnification ({named}) or a target mpp (µm/px)")
    if codec is not None:
        codec_attr = codec_settings(codec, **(codec_options or {}))
    elif codec_options:
        raise ValueError("codec options need the codec they belong to")
    else:
        codec_attr = dict(existing.codec) if existing is not None else codec_settings(DEFAULTS["codec"])

    def pick(value, name):
        if value is not None:
            return value
        return getattr(existing, name) if existing is not None else DEFAULTS[name]

    segmentation = tissue.to_json() if tissue is not None else (
        dict(existing.segmentation) if existing is not None else TissueSettings().to_json())
    attrs = StoreAttrs(
        magnification=float(magnification), mpp=float(target_mpp), region_size=int(pick(region_size, "region_size")),
        min_foreground=float(pick(min_foreground, "min_foreground")), codec=codec_attr, segmentation=segmentation,
        pipeline_version=pipeline.__version__,
        decode={"dct_scaled": bool(scaled_decode)} if scaled_decode is not None else (
            dict(existing.decode) if existing is not None else {"dct_scaled": False}),
    )
    if attrs.region_size < 1:
        raise ValueError(f"region size must be ≥ 1 px, got {attrs.region_size}")
    if not 0.0 <= attrs.min_foreground <= 1.0:
        raise ValueError(f"min foreground must be in [0, 1], got {attrs.min_foreground}")
    return attrs


def _tissue_settings(segmentation: dict[str, Any]) -> TissueSettings:
    names = {f.name for f in dataclasses.fields(TissueSettings)}
    return TissueSettings(**{k: v for k, v in segmentation.items() if k in names})


def build_store(
    manifest_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    magnification: float | None = None,
    mpp: float | None = None,
    codec: str | None = None,
    codec_options: dict[str, Any] | None = None,
    min_foreground: float | None = None,
    region_size: int | None = None,
    tissue: TissueSettings | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    progress: bool = True,
    skip_missing: bool = False,
    prune: bool = False,
    repair: bool = False,
    allow_upsampling: bool = False,
    use_flock: bool = True,
    table_batch: TableBatch = TableBatch(),
    reader: str = "auto",
    scaled_decode: bool | None = None,
) -> BuildSummary:
    """Build (or resume) the tile store `out` from a manifest.

    magnification: a named one (2.5, 5, 10, 20, 40 = 4, 2, 1, 0.5, 0.25 µm/px) or `mpp`:
    any target µm/px; region_size: R in px; min_foreground: least tissue fraction of a
    kept region. A setting left None is the existing store's (else the default), so a
    re-run needs no options. workers: local Dask worker processes (0 runs every slide in
    this process, in order); scheduler: address of an existing Dask scheduler (overrides
    workers; its workers need this package and the store's path). skip_missing: a slide
    whose file is absent is recorded as failed instead of stopping the build; prune:
    remove slides not in the manifest; repair: verify complete slides and redo the corrupt
    ones; allow_upsampling: tile slides scanned coarser than the target (recorded);
    use_flock False: an exclusive lease file instead of flock (`pipeline.locking`).
    reader: "auto" | "direct" | "openslide" (`pipeline.readers`; recorded per slide, not a
    store setting); scaled_decode: DCT-domain scaled JPEG decoding (inexact; a store setting;
    None = the existing store's, else off). A local build of one slide runs in this process
    (a cluster's start costs more than it saves).
    Raises ManifestError (every bad row) before any work, StoreMismatchError (the
    settings that differ) when `out` holds a store with other settings, StoreLockedError
    when another build holds it. Slide failures do not raise: see the summary.
    """
    started = time.perf_counter()
    if workers < 0:
        raise ValueError(f"workers must be ≥ 0, got {workers}")
    rows = load_manifest(manifest_path, skip_missing=skip_missing)
    store_path = os.path.abspath(out)  # workers of a --scheduler cluster resolve paths on their own
    check_store_folder(store_path)
    Path(store_path).mkdir(parents=True, exist_ok=True)
    with build_lock(store_path, use_flock=use_flock) as writer:
        try:
            existing = read_store_attrs(store_path)
        except NotATileStoreError:  # no store yet, or an interrupted creation: create_store finishes it
            existing = None
        attrs = create_store(store_path, resolve_store_attrs(
            existing, magnification=magnification, mpp=mpp, codec=codec, codec_options=codec_options,
            min_foreground=min_foreground, region_size=region_size, tissue=tissue, scaled_decode=scaled_decode,
        ))
        settings = ProcessSettings(
            target_mpp=attrs.mpp, region_size=attrs.region_size, min_foreground=attrs.min_foreground,
            codec=attrs.codec["name"],
            codec_settings={k: v for k, v in attrs.codec.items() if k not in ("name", "zarr_codec")},
            tissue=_tissue_settings(attrs.segmentation), allow_upsampling=allow_upsampling,
            build_id=writer.build_id, reader=reader, scaled_decode=bool(attrs.decode.get("dct_scaled", False)),
        )
        if scheduler is None:
            # Starting a local cluster takes seconds: more than a one-slide build can gain from it.
            workers = 0 if len(rows) <= 1 else min(workers, len(rows))
            # Cores the worker processes leave idle decode tiles in threads (direct reader).
            threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
            settings = dataclasses.replace(settings, decode_threads=threads)
        summary = _run(rows, store_path, settings, workers=workers, scheduler=scheduler, progress=progress,
                       prune=prune, repair=repair, batch=table_batch)
    return dataclasses.replace(summary, seconds=time.perf_counter() - started)


def _run(rows: list[ManifestRow], store_path: str, settings: ProcessSettings, *, workers: int,
         scheduler: str | None, progress: bool, prune: bool, repair: bool, batch: TableBatch) -> BuildSummary:
    """Reconcile, prune/repair, run one task per slide, write the table in batches; the
    summary's `seconds` is left for the caller."""
    table, report = reconcile(store_path)
    batched = BatchedTable(store_path, table, batch)
    manifest_ids = {row.slide_id for row in rows}
    stale = tuple(sorted((set(table.slides) | set(table.failures)) - manifest_ids))
    pruned: tuple[str, ...] = ()
    statuses: dict[str, SlideStatus] = {}
    if prune and stale:
        for slide_id in stale:
            _remove_group(store_path, slide_id)
            batched.remove(slide_id)
            statuses[slide_id] = SlideStatus(slide_id=slide_id, state="pruned", reason="not in the manifest")
        pruned, stale = stale, ()
        batched.flush()
    repaired: tuple[str, ...] = ()
    if repair:
        from pipeline.verify import verify_store

        bad = verify_store(store_path, slide_ids=[r.slide_id for r in rows]).problems
        repaired = tuple(sorted(bad))
    written: list[str] = []
    skipped: list[str] = []
    failures: dict[str, FailureRecord] = {}
    n_regions = 0
    tasks = []
    for row in rows:
        record = batched.slides.get(row.slide_id)
        if not Path(row.path).exists() and record is None:  # --skip-missing: recorded, never dispatched
            failure = FailureRecord(slide_id=row.slide_id, source_path=row.path,
                                    reason=f"slide file not found: {row.path}", error_type="SlideNotFoundError")
            batched.put_failure(failure)
            failures[row.slide_id] = failure
            statuses[row.slide_id] = SlideStatus(slide_id=row.slide_id, state="missing", reason=failure.reason)
            continue
        known = SkipKey.of(record) if record is not None and row.slide_id not in repaired else None
        tasks.append((row, store_path, settings, known))
    bar = tqdm(total=len(tasks), unit="slide", desc="tiling", disable=not progress)
    try:
        with _executor(workers, scheduler) as run_all:
            for row, result in run_all(tasks):
                if result is None:
                    skipped.append(row.slide_id)
                    current = batched.slides[row.slide_id]
                    relabelled = _with_manifest_fields(current, row)
                    if relabelled != current:
                        batched.put_slide(relabelled)
                    statuses[row.slide_id] = SlideStatus(slide_id=row.slide_id, state="skipped",
                                                         n_regions=current.n_regions)
                elif result.ok and result.record is not None:
                    batched.put_slide(result.record)
                    written.append(row.slide_id)
                    n_regions += result.n_regions
                    statuses[row.slide_id] = SlideStatus(slide_id=row.slide_id, state="written",
                                                         n_regions=result.n_regions, seconds=result.seconds)
                else:
                    failure = result.failure or FailureRecord(
                        slide_id=row.slide_id, source_path=row.path, reason="the task returned no record",
                        error_type="RuntimeError",
                    )
                    _remove_group(store_path, row.slide_id)
                    batched.put_failure(failure)
                    failures[row.slide_id] = failure
                    statuses[row.slide_id] = SlideStatus(slide_id=row.slide_id, state="failed",
                                                         seconds=result.seconds, reason=failure.reason)
                bar.update(1)
                bar.set_postfix(failed=len(failures), refresh=False)
    finally:
        bar.close()
        batched.flush()
    ordered = tuple(statuses[row.slide_id] for row in rows if row.slide_id in statuses) + tuple(
        statuses[i] for i in pruned)
    status_csv = write_status_csv(store_path, ordered)
    return BuildSummary(
        store_path=store_path, total=len(rows), written=tuple(written), skipped=tuple(skipped),
        failures=tuple(failures.values()), n_regions=n_regions,
        reconciled={"added": report.added, "refreshed": report.refreshed, "dropped": report.dropped},
        stale=stale, pruned=pruned, repaired=repaired, statuses=ordered, status_csv=str(status_csv),
    )


def _with_manifest_fields(record: SlideRecord, row: ManifestRow) -> SlideRecord:
    """A complete slide's table row with the manifest's current label/split/case/extra
    columns (editing labels needs no re-tiling; the table is what readers trust)."""
    return dataclasses.replace(
        record, label=row.label, split=row.split, case_id=row.case_id, extra=dict(row.extra), source_path=row.path,
    )


def _remove_group(store_path: str, slide_id: str) -> None:
    """A slide that failed (or is pruned) keeps no visible group (else reconcile would
    bring it back): renamed aside in one step, then deleted."""
    group = Path(store_path) / SLIDES_GROUP / slide_id
    if group.exists():
        aside = group.with_name(temp_group_name(slide_id))
        os.rename(group, aside)
        shutil.rmtree(aside, ignore_errors=True)


Task = tuple[ManifestRow, str, ProcessSettings, "SkipKey | None"]
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
