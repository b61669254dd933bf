"""Tiling throughput benchmark (not a test): `python bench/tiles.py`.

Generates (once, cached under bench/out/) a large pyramidal JPEG-tiled TIFF made from
the real sample slide's tissue: 20480×20480 px at 0.5 µm/px, levels 1/4/16, tissue on
about 40 % of it. Then, at 5× and 10×, on the same regions:

  pipeline   segmentation + extraction + writing the store; two slides (the bench slide
             listed twice) on 2 worker processes. "warm": process_slide on an
             already-started 2-process pool; "driver": `build_store(workers=2)` wall
             time including the Dask cluster's start.
  naive      CLAM-style: one read_region at level 0 per region, then resize (1 and 2 processes)
  block      read the pyramid level the pipeline reads in 4096-px blocks and slice (and
             block-mean when the level is finer); no segmentation, no writing (1 and 2 processes)

and the bytes per stored region for each codec. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.demo_cohort import fetch_sample_slide  # noqa: E402
from pipeline.driver import build_store  # noqa: E402
from pipeline.extract import block_mean_uint8  # noqa: E402
from pipeline.grid import choose_level, region_grid  # noqa: E402
from pipeline.manifest import ManifestRow  # noqa: E402
from pipeline.process import ProcessSettings, process_slide  # noqa: E402
from pipeline.schema.codecs import codec_settings  # noqa: E402
from pipeline.schema.format import StoreAttrs  # noqa: E402
from pipeline.slide import open_slide, read_rgb, resolve_mpp  # noqa: E402
from pipeline.store_writer import create_store  # noqa: E402
from pipeline.tissue import TissueSettings, segment_tissue  # noqa: E402

R = 224
MPP0 = 0.5
TILE = 256
DOWNSAMPLES = (1, 4, 16)
MASK_CELL = 16  # level-0 px per cell of the analytic tissue mask
BACKGROUND = 243


# ---------------------------------------------------------------- the bench slide

def _tissue_cells(size: int, fraction: float, seed: int) -> np.ndarray:
    """(size/16, size/16) bool: seeded ellipses added until they cover `fraction` of the slide."""
    n = size // MASK_CELL
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    mask = np.zeros((n, n), bool)
    while mask.mean() < fraction:
        cx, cy = rng.uniform(0.1, 0.9, 2) * n
        rx, ry = rng.uniform(0.06, 0.16, 2) * n
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return mask


def _dense_texture(seed: int, patch: int = 128, side: int = 2048) -> np.ndarray:
    """(side, side, 3) uint8 at 0.5 µm/px: a seeded mosaic of the real slide's patches that are ≥ 90 % tissue."""
    sample = fetch_sample_slide(REPO / "data" / "sample")
    slide = open_slide(sample)
    pixels = read_rgb(slide, (0, 0), 0, slide.level_dimensions[0])
    saturation = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
    patches = []
    for y in range(0, pixels.shape[0] - patch + 1, patch // 2):
        for x in range(0, pixels.shape[1] - patch + 1, patch // 2):
            if (saturation[y : y + patch, x : x + patch] > 25).mean() >= 0.9:
                patches.append(pixels[y : y + patch, x : x + patch])
    rng = np.random.default_rng(seed)
    n = side // patch
    choice = rng.integers(0, len(patches), n * n)
    rows = [np.concatenate([np.rot90(patches[choice[r * n + c]], k=int(rng.integers(0, 4))) for c in range(n)], 1) for r in range(n)]
    return np.concatenate(rows, 0)


def make_bench_slide(path: Path, size: int, fraction: float = 0.4, seed: int = 0) -> Path:
    """Write the bench slide (see module docstring) unless it exists; returns its path."""
    if path.exists():
        return path
    texture = _dense_texture(seed)
    h, w = texture.shape[:2]
    mirrored = np.concatenate([np.concatenate([texture, texture[:, ::-1]], 1), np.concatenate([texture[::-1], texture[::-1, ::-1]], 1)], 0)
    cells = _tissue_cells(size, fraction, seed)

    def tiles(factor: int):
        texture = mirrored if factor == 1 else block_mean_uint8(mirrored, factor)
        th, tw = texture.shape[:2]
        level_size = size // factor
        for ty in range(0, level_size, TILE):
            rows = np.arange(ty, ty + TILE)
            for tx in range(0, level_size, TILE):
                cols = np.arange(tx, tx + TILE)
                pixels = texture[(rows % th)[:, None], (cols % tw)[None, :]]
                inside = cells[np.minimum(rows * factor // MASK_CELL, cells.shape[0] - 1)[:, None],
                               np.minimum(cols * factor // MASK_CELL, cells.shape[1] - 1)[None, :]]
                yield np.where(inside[..., None], pixels, np.uint8(BACKGROUND))

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(partial, bigtiff=True) as tiff:
        for index, factor in enumerate(DOWNSAMPLES):
            px_per_cm = 1e4 / (MPP0 * factor)
            tiff.write(
                tiles(factor), shape=(size // factor, size // factor, 3), dtype=np.uint8, tile=(TILE, TILE),
                photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1, metadata=None,
            )
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------- baselines (worker functions)

def _warm(_: int) -> int:
    import openslide  # noqa: F401

    return os.getpid()


def naive_worker(path: str, origins: np.ndarray, step: float) -> int:
    """One read_region at level 0 per region, RGBA → RGB, resize to R×R: returns regions done."""
    import openslide

    slide = openslide.OpenSlide(path)
    side = math.ceil(step)
    for x, y in origins:
        region = slide.read_region((int(x), int(y)), 0, (side, side)).convert("RGB")
        region.resize((R, R), Image.Resampling.BOX, box=(0, 0, step, step))
    return len(origins)


def block_worker(path: str, origins: np.ndarray, step: float, level: int, blocks: list[tuple[int, int]], block: int) -> int:
    """Read level `level` in `block`-px blocks (those holding a region's corner) and slice
    each region out (block mean when the level is finer than needed): returns regions done."""
    slide = open_slide(path)
    ds = slide.level_downsamples[level]
    span = step / ds
    factor = round(span / R)
    lx, ly = origins[:, 0] / ds, origins[:, 1] / ds
    done = 0
    for bx, by in blocks:
        inside = (lx // block == bx) & (ly // block == by)
        if not inside.any():
            continue
        x0, y0 = int(lx[inside].min()), int(ly[inside].min())
        x1, y1 = math.ceil(lx[inside].max() + span), math.ceil(ly[inside].max() + span)
        pixels = read_rgb(slide, (round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0))
        for x, y in zip(lx[inside], ly[inside]):
            cut = pixels[round(y) - y0 : round(y) - y0 + factor * R, round(x) - x0 : round(x) - x0 + factor * R]
            if factor > 1:
                block_mean_uint8(cut, factor)
            done += 1
    return done


def timed_pool(pool: ProcessPoolExecutor | None, function, jobs: list[tuple]) -> tuple[int, float]:
    """Run jobs in this process (pool None) or on a warm pool: (regions done, seconds)."""
    started = time.perf_counter()
    if pool is None:
        done = sum(function(*job) for job in jobs)
    else:
        done = sum(f.result() for f in [pool.submit(function, *job) for job in jobs])
    return done, time.perf_counter() - started


def _pipeline_job(row: ManifestRow, store: str, settings: ProcessSettings) -> int:
    result = process_slide(row, store, settings)
    if not result.ok:
        raise RuntimeError(result.failure.reason)
    return result.n_regions


def _store(path: Path, magnification: float, target_mpp: float, codec: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    create_store(path, StoreAttrs(
        magnification=magnification, mpp=target_mpp, region_size=R, min_foreground=0.5,
        codec=codec_settings(codec), segmentation=TissueSettings().to_json(), pipeline_version="bench",
    ))
    return str(path)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20480, help="bench slide side in level-0 px (multiple of 4096)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--naive-regions", type=int, default=160, help="regions the naive baseline reads (evenly spread)")
    parser.add_argument("--magnifications", default="5,10")
    args = parser.parse_args()

    slide_path = make_bench_slide(args.out / f"bench_{args.size}.tif", args.size)
    slide = open_slide(slide_path)
    mpp0, _ = resolve_mpp(slide, None)
    tissue = segment_tissue(slide, mpp0, TissueSettings())
    print(f"bench slide {slide_path} ({slide_path.stat().st_size / 2**20:.0f} MiB): {slide.level_dimensions[0]} px at "
          f"{mpp0} µm/px, levels {tuple(round(d) for d in slide.level_downsamples)}, tissue "
          f"{tissue.area / (args.size**2):.0%}; cpus {os.cpu_count()}")
    rows = [ManifestRow(slide_id=f"bench_{k}", path=str(slide_path)) for k in "ab"]
    manifest = args.out / "bench_manifest.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"{r.slide_id},{r.path}\n" for r in rows))
    work = Path(tempfile.mkdtemp(prefix="pm-bench-", dir=args.out))
    table = []
    bytes_per_tile = {}
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_warm, range(4)))
        for magnification in (float(m) for m in args.magnifications.split(",")):
            target = {2.5: 4.0, 5.0: 2.0, 10.0: 1.0, 20.0: 0.5}[magnification]
            grid = region_grid(*slide.level_dimensions[0], mpp0, target, R, tissue, 0.5)
            level, factor = choose_level(slide.level_downsamples, target / mpp0)
            n = len(grid)
            rates: dict[str, float] = {}

            pick = np.linspace(0, n - 1, min(n, args.naive_regions)).astype(int)
            naive = grid.origin[pick]
            done, seconds = timed_pool(None, naive_worker, [(str(slide_path), naive, grid.step)])
            rates["naive, 1 process"] = done / seconds
            done, seconds = timed_pool(pool, naive_worker, [(str(slide_path), naive[k::2], grid.step) for k in range(2)])
            rates["naive, 2 processes"] = done / seconds

            block = 4096
            ds = slide.level_downsamples[level]
            corners = {(int(x / ds) // block, int(y / ds) // block) for x, y in grid.origin}
            blocks = sorted(corners, key=lambda b: (b[1], b[0]))
            done, seconds = timed_pool(None, block_worker, [(str(slide_path), grid.origin, grid.step, level, blocks, block)])
            rates["block read + slice, 1 process"] = done / seconds
            jobs = [(str(slide_path), grid.origin, grid.step, level, blocks[k::2], block) for k in range(2)]
            done, seconds = timed_pool(pool, block_worker, jobs)
            rates["block read + slice, 2 processes"] = done / seconds

            codecs = ("none", "zstd", "jpeg") if magnification == 5.0 else ("none",)
            for codec in codecs:
                store = _store(work / f"mag{magnification:g}-{codec}.zarr", magnification, target, codec)
                settings = ProcessSettings(target_mpp=target, codec=codec)
                done, seconds = timed_pool(pool, _pipeline_job, [(row, store, settings) for row in rows])
                rates[f"pipeline ({codec}), 2 workers, warm"] = done / seconds
                regions_dir = Path(store) / "slides" / rows[0].slide_id / "regions"
                bytes_per_tile[(magnification, codec)] = _dir_bytes(regions_dir) / (done / 2)

            out = work / f"mag{magnification:g}-driver.zarr"
            summary = build_store(manifest, out, magnification=magnification, workers=2, progress=False)
            assert not summary.failures, summary.failures
            rates["pipeline (none), 2 workers, driver incl. Dask start"] = summary.n_regions / summary.seconds

            naive2 = rates["naive, 2 processes"]
            block2 = rates["block read + slice, 2 processes"]
            print(f"\n{magnification:g}× ({target} µm/px): {n} regions per slide, grid step {grid.step:g} level-0 px, "
                  f"reading level {level} (downsample {ds:g}, resize factor {factor:g})")
            print(f"  {'method':56s} {'tiles/s':>8s} {'× naive(2)':>10s} {'% block(2)':>10s}")
            for name, rate in rates.items():
                print(f"  {name:56s} {rate:8.0f} {rate / naive2:10.1f} {rate / block2:10.0%}")
    print("\nbytes per stored 224×224 region (the regions array's files incl. metadata and shard index; raw = 150528):")
    for (magnification, codec), size in bytes_per_tile.items():
        print(f"  {magnification:g}×  {codec:5s} {size:9.0f}  ({150528 / size:.1f}× smaller than raw)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
