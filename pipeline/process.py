"""One slide end to end, as one Dask task: open → MPP → fingerprint → tissue → grid → extract → write.

`process_slide` never raises: every error becomes a `FailureRecord` with a specific
reason, so one bad slide never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import shapely

import pipeline
from pipeline.extract import dct_scale_for, iter_regions
from pipeline.grid import LEVEL_TOLERANCE, choose_level, region_grid
from pipeline.manifest import ManifestRow
from pipeline.readers import OpenSlideReader, open_reader
from pipeline.schema.format import TISSUE_GEOJSON, FailureRecord, SlideRecord
from pipeline.slide import SlideError, fingerprint, resolve_mpp, source_fingerprint
from pipeline.store_writer import write_slide
from pipeline.tissue import TissueSettings, load_tissue_geojson, mask_to_polygons, tissue_mask, tissue_to_geojson


class NoTissueError(Exception):
    """No region of the slide reaches the foreground threshold."""


class TissueGeojsonError(Exception):
    """The manifest's tissue_geojson file cannot be used."""


class UpsamplingError(Exception):
    """The target resolution is finer than the slide's level 0 and upsampling was not allowed."""


def file_sha256(path: str) -> str:
    """sha256 hex of a (small) file, e.g. a manifest's tissue GeoJSON: part of a slide's skip key."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class ProcessSettings:
    """How to tile a slide. target_mpp: µm/px of the regions; region_size: R in px;
    min_foreground: least tissue fraction of a kept region; codec, codec_settings: the
    store's region codec (the store decides; recorded here for the driver's create_store);
    tissue: segmentation settings; allow_upsampling: tile a slide whose level 0 is coarser
    than the target (recorded per slide) instead of failing it; build_id: the driver's
    build (`pipeline.locking`), so a task commits only while that build holds the store;
    reader: slide backend, "auto" | "direct" | "openslide" (`pipeline.readers`; not a store
    setting: the pixels agree); scaled_decode: decode JPEG tiles at 1/2–1/8 in libjpeg when
    the level is ≥ 2× finer than the target (inexact: a store setting, `StoreAttrs.decode`);
    decode_threads: decoder threads per slide (direct reader)."""

    target_mpp: float
    region_size: int = 224
    min_foreground: float = 0.5
    codec: str = "none"
    codec_settings: dict[str, Any] = field(default_factory=dict)
    tissue: TissueSettings = field(default_factory=TissueSettings)
    allow_upsampling: bool = False
    build_id: str | None = None
    reader: str = "auto"
    scaled_decode: bool = False
    decode_threads: int = 1


@dataclass(frozen=True, kw_only=True)
class SlideResult:
    """Outcome of one slide: exactly one of `record` (ok) and `failure` is set; seconds: wall time."""

    slide_id: str
    ok: bool
    record: SlideRecord | None
    failure: FailureRecord | None
    seconds: float
    n_regions: int


def _failure(row: ManifestRow, error: BaseException, started: float) -> SlideResult:
    if isinstance(error, (SlideError, NoTissueError, TissueGeojsonError, UpsamplingError)):
        reason = str(error)
    else:
        where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
        at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
        reason = f"{type(error).__name__}: {error}{at}"
    failure = FailureRecord(slide_id=row.slide_id, source_path=row.path, reason=reason, error_type=type(error).__name__)
    return SlideResult(
        slide_id=row.slide_id, ok=False, record=None, failure=failure,
        seconds=time.perf_counter() - started, n_regions=0,
    )


def process_slide(row: ManifestRow, store_path: str, settings: ProcessSettings) -> SlideResult:
    """Tile one slide into the (existing) store at `store_path` and commit its group.

    Failure reasons: missing file, not a slide, unreadable/truncated file, no MPP,
    unusable tissue GeoJSON, no tissue regions; any other error with its type and message.
    """
    started = time.perf_counter()
    try:
        return _process(row, store_path, settings, started)
    except Exception as error:  # noqa: BLE001 — a task reports, it never raises
        return _failure(row, error, started)


def _process(row: ManifestRow, store_path: str, settings: ProcessSettings, started: float) -> SlideResult:
    slide = open_reader(row.path, settings.reader, threads=settings.decode_threads)
    try:
        mpp0, mpp_source = resolve_mpp(slide, row.mpp)
        upsampled = settings.target_mpp < mpp0 * (1 - LEVEL_TOLERANCE)
        if upsampled and not settings.allow_upsampling:
            raise UpsamplingError(
                f"target {settings.target_mpp:g} µm/px is finer than the slide's level 0 ({mpp0:g} µm/px, from "
                f"{mpp_source}): its regions would be upsampled ×{mpp0 / settings.target_mpp:.2f}, inventing detail; "
                "build a coarser store, or pass --allow-upsampling (recorded in the slide table)"
            )
        # The same fingerprint whichever reader runs, so switching readers re-tiles nothing.
        if isinstance(slide, OpenSlideReader):
            slide_fingerprint = fingerprint(row.path, slide.slide)
        else:
            slide_fingerprint = source_fingerprint(row.path)
        geojson_sha256 = None
        if row.tissue_geojson:
            try:
                geojson_sha256 = file_sha256(row.tissue_geojson)
                tissue = load_tissue_geojson(row.tissue_geojson)
            except (OSError, ValueError) as error:
                raise TissueGeojsonError(str(error)) from None
            stored_tissue = tissue
        else:
            mask = tissue_mask(slide, mpp0, settings.tissue)
            tissue = mask_to_polygons(mask.mask, mask.downsample)
            # Traced contours have a vertex per mask pixel edge; within one mask pixel they say no more.
            stored_tissue = shapely.simplify(tissue, mask.downsample, preserve_topology=True)
        width0, height0 = slide.level_dimensions[0]
        grid = region_grid(
            width0, height0, mpp0, settings.target_mpp, settings.region_size, tissue, settings.min_foreground
        )
        if len(grid) == 0:
            where = "in the manifest's tissue_geojson" if row.tissue_geojson else "found by segmentation"
            raise NoTissueError(
                f"no tissue regions with ≥ {settings.min_foreground:g} foreground: "
                f"{settings.region_size} px regions at {settings.target_mpp:g} µm/px on a "
                f"{grid.grid_shape[0]}×{grid.grid_shape[1]} grid, tissue area {tissue.area * mpp0 * mpp0 / 1e6:.3g} mm² {where}"
            )
        level, resize_factor = choose_level(slide.level_downsamples, settings.target_mpp / mpp0)
        tissue_geojson = tissue_to_geojson(stored_tissue)
        dct_scale = dct_scale_for(slide, level, resize_factor) if settings.scaled_decode else 1
        attrs = {
            "source_path": row.path,
            "fingerprint": slide_fingerprint,
            "mpp0": mpp0,
            "mpp_source": mpp_source,
            "target_mpp": settings.target_mpp,
            "level": level,
            "level_downsample": float(slide.level_downsamples[level]),
            "resize_factor": resize_factor,
            "dct_scale": dct_scale,
            "reader": slide.description,
            "grid_shape": list(grid.grid_shape),
            "step": grid.step,
            "tissue_geojson": tissue_geojson,
            "tissue_source": "manifest" if row.tissue_geojson else "segmentation",
            "label": row.label,
            "split": row.split,
            "case_id": row.case_id,
            "extra": dict(row.extra),
            "manifest_mpp": row.mpp,
            "tissue_geojson_sha256": geojson_sha256,
            "upsampled": bool(upsampled),
            "pipeline_version": pipeline.__version__,
        }
        regions = iter_regions(
            slide, grid, level, settings.region_size, resize_factor=resize_factor, dct_scale=dct_scale
        )
        written = write_slide(
            store_path, row.slide_id,
            regions=regions, n_regions=len(grid),
            coords=grid.coords, origin=grid.origin, foreground=grid.foreground,
            attrs=attrs,
            files={TISSUE_GEOJSON: json.dumps(tissue_geojson, separators=(",", ":")).encode()},
            build_id=settings.build_id,
            background=True,  # iter_regions yields a new array per region
        )
    finally:
        slide.close()
    record = SlideRecord(
        slide_id=row.slide_id,
        n_regions=len(grid),
        label=row.label,
        split=row.split,
        case_id=row.case_id,
        source_path=row.path,
        fingerprint=slide_fingerprint,
        checksum=written["checksum"],
        mpp_source=mpp_source,
        grid_shape=grid.grid_shape,
        extra=dict(row.extra),
        manifest_mpp=row.mpp,
        tissue_geojson_sha256=geojson_sha256,
        upsampled=bool(upsampled),
        reader=slide.description,
    )
    return SlideResult(
        slide_id=row.slide_id, ok=True, record=record, failure=None,
        seconds=time.perf_counter() - started, n_regions=len(grid),
    )

