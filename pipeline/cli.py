"""`pm-tiles`: build, inspect and QC tile stores (`build`, `info`, `qc`, `manifest`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.schema.errors import TileStoreError
from pipeline.schema.format import MAGNIFICATION_TO_MPP, REGIONS, SLIDES_GROUP

MAGNIFICATIONS = [f"{m:g}" for m in MAGNIFICATION_TO_MPP]


EXIT_SLIDES_FAILED = 1  # the build ran; some slides failed (listed in the summary and the store)
EXIT_BAD_INPUT = 2  # nothing was done: bad manifest, store or settings (click's usage errors use 2 too)


class InputError(click.ClickException):
    exit_code = EXIT_BAD_INPUT


def _clean_errors(function):
    """Turn expected errors (bad manifest, bad store, bad settings) into one-line CLI errors
    with exit status 2, distinct from 1 = "the build ran and some slides failed"."""
    import functools

    from pipeline.manifest import ManifestError

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ManifestError, TileStoreError, ValueError) as error:
            raise InputError(str(error)) from None

    return wrapper


@click.group()
def main() -> None:
    """Whole-slide images → Zarr tile stores for Pixel-Mamba."""


@main.command()
@click.option("--manifest", "manifest", required=True, type=click.Path(dir_okay=False), help="Manifest CSV (data_manifests/<dataset>.csv).")
@click.option("--magnification", default=None, type=click.Choice(MAGNIFICATIONS),
              help="Target magnification: 2.5, 5, 10, 20 or 40 (= 4, 2, 1, 0.5, 0.25 µm/px). Default: the existing store's.")
@click.option("--mpp", "target_mpp", default=None, type=click.FloatRange(min=0.0, min_open=True),
              help="Any target resolution in µm/px instead of --magnification (e.g. 0.3).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Tile store to create or resume, e.g. tiles/demo/mag5.zarr.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="Local Dask worker processes; 0 runs in this process.")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler, e.g. tcp://host:8786 (overrides --workers).")
@click.option("--codec", default=None, type=click.Choice(["none", "zstd", "jpeg"]),
              help="Regions layout: none = raw and memory-mapped (fastest reads; the default for a new store), zstd = lossless, jpeg = q90, ~6–8× smaller (~30 dB PSNR on tissue), for network sharing.")
@click.option("--jpeg-quality", default=None, type=click.IntRange(1, 100), help="JPEG quality (codec jpeg; default 90).")
@click.option("--zstd-level", default=None, type=click.IntRange(1, 22), help="zstd level (codec zstd; default 3).")
@click.option("--min-foreground", default=None, type=click.FloatRange(0.0, 1.0), help="Least tissue fraction of a kept region (new store: 0.5).")
@click.option("--region-size", default=None, type=click.IntRange(min=1), help="Region side R in px at the target resolution (new store: 224).")
@click.option("--pen-filter/--no-pen-filter", default=None, help="Drop blue/green/black marker ink from the tissue mask (new store: off).")
@click.option("--allow-upsampling", is_flag=True, help="Tile slides scanned coarser than the target (upsampled; recorded per slide) instead of failing them.")
@click.option("--skip-missing", is_flag=True, help="Record a slide whose file is missing as failed and tile the others (default: stop before any work).")
@click.option("--prune", is_flag=True, help="Remove slides that are in the store but no longer in the manifest.")
@click.option("--repair", is_flag=True, help="Verify the complete slides first and redo the corrupt or missing ones.")
@click.option("--no-lock", is_flag=True, help="File systems without flock: hold the store with an exclusive lease file instead.")
@click.option("--reader", default="auto", show_default=True, type=click.Choice(["auto", "direct", "openslide"]),
              help="Slide reader: direct = tifffile + libjpeg-turbo for SVS/TIFF/OME-TIFF; openslide = any OpenSlide format; "
                   "auto = direct where it applies, else OpenSlide (recorded per slide; not a store setting).")
@click.option("--scaled-decode/--exact-decode", default=None,
              help="Decode JPEG tiles at 1/2–1/8 inside libjpeg when the level is ≥ 2× finer than needed: faster, "
                   "NOT exact (a store setting; default: the existing store's, else exact).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@_clean_errors
def build(manifest, magnification, target_mpp, out, workers, scheduler, codec, jpeg_quality, zstd_level, min_foreground,
          region_size, pen_filter, allow_upsampling, skip_missing, prune, repair, no_lock, reader, scaled_decode,
          progress) -> None:
    """Tile every slide of MANIFEST into the store OUT (resumes with the store's own settings;
    exit status 1 when any slide failed, 2 when bad input stopped the build before any work)."""
    from pipeline.driver import build_store
    from pipeline.tissue import TissueSettings

    if magnification is not None and target_mpp is not None:
        raise click.UsageError("give --magnification or --mpp, not both")
    options = {}
    if jpeg_quality is not None:
        if codec != "jpeg":
            raise click.UsageError("--jpeg-quality needs --codec jpeg")
        options["quality"] = jpeg_quality
    if zstd_level is not None:
        if codec != "zstd":
            raise click.UsageError("--zstd-level needs --codec zstd")
        options["level"] = zstd_level
    summary = build_store(
        manifest, out, magnification=None if magnification is None else float(magnification), mpp=target_mpp,
        codec=codec, codec_options=options, min_foreground=min_foreground, region_size=region_size,
        tissue=None if pen_filter is None else TissueSettings(pen_filter=pen_filter),
        workers=workers, scheduler=scheduler, progress=progress, skip_missing=skip_missing, prune=prune,
        repair=repair, allow_upsampling=allow_upsampling, use_flock=not no_lock,
        reader=reader, scaled_decode=scaled_decode,
    )
    click.echo(summary.format())
    if not summary.ok:
        sys.exit(EXIT_SLIDES_FAILED)


STORAGE_OPTIONS_HELP = (
    "fsspec storage options as JSON for a remote store, e.g. '{\"anon\": true}' or "
    "'{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}' (s3:// reads the AWS_* "
    "environment variables, AWS_ENDPOINT_URL included, by default)."
)


def _storage_options(text: str | None) -> dict | None:
    import json

    if text is None:
        return None
    try:
        options = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"not JSON: {error}", param_hint="--storage-options") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return options


@main.command()
@click.argument("store")
@click.option("--verify", is_flag=True, help="Also run `pm-tiles verify` (reads all data).")
@click.option("--storage-options", "storage_options", default=None, help=STORAGE_OPTIONS_HELP)
@_clean_errors
def info(store, verify, storage_options) -> None:
    """Describe the tile store STORE (path or URL): settings, counts per split and label, sizes, failures."""
    from pipeline.schema.reader import open_store

    opened = open_store(store, storage_options=_storage_options(storage_options))
    attrs = opened.attrs
    codec = dict(attrs.codec)
    name = codec.pop("name")
    codec.pop("zarr_codec", None)
    settings = ", ".join(f"{k} {v}" for k, v in codec.items())
    slides = opened.slides
    n_regions = int(slides["n_regions"].sum()) if len(slides) else 0
    lines = [
        f"store          {opened.url}",
        f"format         {attrs.format} {attrs.version} (pipeline {attrs.pipeline_version}, created {attrs.created})",
        f"magnification  {attrs.magnification:.3g}× ({attrs.mpp:g} µm/px), regions {attrs.region_size}×{attrs.region_size} px, "
        f"min foreground {attrs.min_foreground:g}",
        f"codec          {name}" + (f" ({settings})" if settings else ""),
        f"slides         {len(slides)} complete, {len(opened.failures)} failed; {n_regions} regions"
        + (f" (min {int(slides['n_regions'].min())}, max {int(slides['n_regions'].max())} per slide)" if len(slides) else ""),
    ]
    if len(slides):
        labels = slides["label"].fillna("(none)").value_counts().sort_index()
        lines.append("labels         " + ", ".join(f"{k}: {v}" for k, v in labels.items()))
        splits = slides["split"].fillna("(none)").value_counts().sort_index()
        lines.append("splits         " + ", ".join(f"{k}: {v}" for k, v in splits.items()))
        lines.append(_split_label_table(slides))
    if opened.is_local:
        root = Path(opened.url)
        regions = sum(_disk_size(root / SLIDES_GROUP / slide_id / REGIONS) for slide_id in opened.slide_ids)
        raw = n_regions * attrs.region_size * attrs.region_size * 3
        ratio = f", {raw / regions:.2f}× smaller than raw" if raw and regions and name != "none" else ""
        lines.append(f"size on disk   {_human(_disk_size(root))} (regions {_human(regions)}"
                     + (f", {regions / n_regions / 1024:.1f} KiB per region" if n_regions else "") + f"{ratio})")
    for row in opened.failures.itertuples():
        lines.append(f"FAILED         {row.slide_id} ({row.source_path}): {row.reason}")
    click.echo("\n".join(lines))
    if verify:
        from pipeline.verify import verify_store

        report = verify_store(store, storage_options=_storage_options(storage_options))
        click.echo(report.format() if not report.ok else f"verified       {report.n_slides} slides: checksums match")
        if not report.ok:
            sys.exit(EXIT_SLIDES_FAILED)


def _split_label_table(slides) -> str:
    """Slides per split (rows) and label (columns), as text."""
    import pandas as pd

    table = pd.crosstab(slides["split"].fillna("(none)"), slides["label"].fillna("(none)"), margins=True,
                        margins_name="all")
    table.columns.name = None
    text = table.rename_axis("split \\ label").reset_index().to_string(index=False)
    return "per split and label:\n" + "\n".join("  " + line for line in text.splitlines())


@main.command()
@click.argument("store")
@click.option("--storage-options", "storage_options", default=None, help=STORAGE_OPTIONS_HELP)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@_clean_errors
def verify(store, storage_options, progress) -> None:
    """Check every slide of STORE (path or URL), streamed: format, shapes, dtypes, decoding and
    content checksums. Lists every corrupt or missing slide; exit status 1 when there is any."""
    from pipeline.verify import verify_store

    report = verify_store(store, storage_options=_storage_options(storage_options), progress=progress)
    click.echo(report.format())
    if not report.ok:
        sys.exit(EXIT_SLIDES_FAILED)


@main.command()
@click.argument("source")
@click.argument("local", type=click.Path(file_okay=False))
@click.option("--codec", default=None, type=click.Choice(["none", "zstd", "jpeg"]),
              help="Transcode the regions (default: keep the source's codec); none = memory-mapped reads.")
@click.option("--storage-options", "storage_options", default=None, help=STORAGE_OPTIONS_HELP)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@_clean_errors
def stage(source, local, codec, storage_options, progress) -> None:
    """Copy the store SOURCE (path or URL) to the local folder LOCAL, verifying every slide's
    checksums as it is read; resumable (slides already staged are skipped)."""
    from pipeline.stage import stage_store

    summary = stage_store(source, local, codec=codec, storage_options=_storage_options(storage_options),
                          progress=progress)
    click.echo(summary.format())
    if not summary.ok:
        sys.exit(EXIT_SLIDES_FAILED)


@main.command("export-coords")
@click.argument("store")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the coordinate files.")
@click.option("--format", "fmt", default="h5", show_default=True, type=click.Choice(["h5", "csv"]),
              help="h5: one CLAM/TRIDENT-style <slide_id>.h5 per slide (dataset coords, level-0 x, y); csv: one coords.csv.")
@click.option("--storage-options", "storage_options", default=None, help=STORAGE_OPTIONS_HELP)
@_clean_errors
def export_coords(store, out, fmt, storage_options) -> None:
    """Write each complete slide's region coordinates (level-0 origins, patch size and level)
    for MIL code that reads CLAM/TRIDENT patch files."""
    from pipeline.export import export_coords as run_export

    paths = run_export(store, out, fmt=fmt, storage_options=_storage_options(storage_options))
    click.echo(f"wrote {len(paths)} coordinate file(s) to {out}")


@main.command()
@click.argument("store")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs (one per slide).")
@click.option("--max-side", default=1000, show_default=True, type=click.IntRange(16, 1000), help="Longest side of a picture in px.")
@_clean_errors
def qc(store, out, max_side) -> None:
    """One PNG per slide of STORE: thumbnail, tissue contour (green), kept regions (blue)."""
    from pipeline.qc import QcSettings, write_qc

    paths = write_qc(store, out, QcSettings(max_side=max_side))
    click.echo(f"wrote {len(paths)} QC picture(s) to {out}")


def _disk_size(path: Path) -> int:
    """Bytes in the files under `path` (the writer's side: local stores only)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


# `pm-tiles manifest` lives with the manifest logic.
from pipeline.manifest_cli import manifest_command  # noqa: E402

main.add_command(manifest_command, "manifest")


if __name__ == "__main__":
    main()
