"""Tiling throughput benchmark (not a test): `python bench/tiles.py [--quick]`.

Generates (once, cached under bench/out/) two pyramidal JPEG-tiled TIFFs made from the real
sample slide's tissue, SIZE² px at 0.5 µm/px (20×), tissue on ~40 %:
  A: levels 1/4/16 (no 2× level), run at 5×, 10× and 20×;
  B: levels 1/2/4/16 (with a 2× level), run at 5×.
On each, with the same kept regions, in 1 process (one slide) and 2 processes (two copies of
the slide, one per process), regions per second of:

  TRIDENT-style   per region: OpenSlide read_region at get_best_level_for_downsample, then an
                  area (BOX) resize to R×R: the baseline users run
  CLAM-style      per region: read_region at level 0, then resize (evenly spread subset)
  block + slice   OpenSlide reads of the pipeline's level in 4096-px blocks, regions sliced
                  (and block-averaged) out; no segmentation, no writing
  decode ceiling  imagecodecs (libjpeg-turbo) decode of exactly the tiles the regions need
  pipeline/<r>    process_slide with reader r: open, segmentation, grid, extraction, writing
                  the store (codec none); "direct+dct" adds the inexact DCT-scaled decoding

With --compare CHECKOUT, "pipeline, direct reader (<label>)" rows time that checkout's direct
pipeline the same way, in its own worker processes (bench/checkout_pool.py), side by side;

then the per-slide profile of the direct pipeline, and the driver's wall time with and without
a Dask cluster. Every process runs each code path once before timing; each figure is the best
of --repeats rounds (2), each round running every method once in turn. Figures on a shared machine are noisy: read the ratios, measured side by side.
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
from pipeline.extract import block_mean_uint8, iter_regions  # noqa: E402
from pipeline.grid import choose_level, region_grid  # noqa: E402
from pipeline.manifest import ManifestRow  # noqa: E402
from pipeline.process import ProcessSettings, process_slide  # noqa: E402
from pipeline.readers import OpenSlideReader, open_reader  # noqa: E402
from pipeline.schema.codecs import codec_settings  # noqa: E402
from pipeline.schema.format import StoreAttrs  # noqa: E402
from pipeline.slide import resolve_mpp, source_fingerprint  # noqa: E402
from pipeline.store_writer import create_store, write_slide  # noqa: E402
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
    with open_reader(sample) as slide:
        pixels = slide.read_level(0, 0, 0, *slide.level_dimensions[0])
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


def make_bench_slide(path: Path, size: int, fraction: float = 0.4, seed: int = 0, downsamples=DOWNSAMPLES) -> Path:
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
        for index, factor in enumerate(downsamples):
            px_per_cm = 1e4 / (MPP0 * factor)
            tiff.write(
                tiles(factor), shape=(size // factor, size // factor, 3), dtype=np.uint8, tile=(TILE, TILE),
                photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1, metadata=None,
            )
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------- methods (worker functions)

def _warm(path: str) -> int:
    """Import and run every code path once (zarr, scipy, shapely, PIL, OpenSlide), so that no
    timed run pays a process's first-use costs."""
    work = Path(tempfile.mkdtemp(prefix="pm-warm-"))
    try:
        row = ManifestRow(slide_id="w", path=path)
        for reader in ("direct", "openslide"):
            pipeline_worker(row, _store(work / f"{reader}.zarr", 5.0, 2.0), ProcessSettings(target_mpp=2.0, reader=reader))
        trident_worker(path, np.array([[0, 0]]), 896.0)
        time.sleep(0.5)  # hold this process so that the other warm jobs land on the other ones
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return os.getpid()


def trident_worker(path: str, origins: np.ndarray, step: float) -> int:
    """Per region: read_region at the best level for the downsample, then an area resize."""
    import openslide

    slide = openslide.OpenSlide(path)
    level = slide.get_best_level_for_downsample(step / R)
    ds = slide.level_downsamples[level]
    side = math.ceil(step / ds)
    for x, y in origins:
        region = slide.read_region((int(x), int(y)), level, (side, side)).convert("RGB")
        region.resize((R, R), Image.Resampling.BOX, box=(0, 0, step / ds, step / ds))
    slide.close()
    return len(origins)


def clam_worker(path: str, origins: np.ndarray, step: float) -> int:
    """Per region: read_region at level 0, then resize to R×R."""
    import openslide

    slide = openslide.OpenSlide(path)
    side = math.ceil(step)
    for x, y in origins:
        region = slide.read_region((int(x), int(y)), 0, (side, side)).convert("RGB")
        region.resize((R, R), Image.Resampling.BOX, box=(0, 0, step, step))
    slide.close()
    return len(origins)


def block_worker(path: str, origins: np.ndarray, step: float, level: int, block: int = 4096) -> int:
    """OpenSlide reads of `level` in `block`-px blocks (those holding a region's corner), each
    region sliced out (block mean when the level is finer than needed)."""
    slide = OpenSlideReader.open(path)
    ds = slide.level_downsamples[level]
    span = step / ds
    factor = max(1, round(span / R))
    lx, ly = origins[:, 0] / ds, origins[:, 1] / ds
    done = 0
    for bx, by in sorted({(int(x) // block, int(y) // block) for x, y in zip(lx, ly)}, key=lambda b: (b[1], b[0])):
        inside = (lx // block == bx) & (ly // block == by)
        x0, y0 = int(lx[inside].min()), int(ly[inside].min())
        x1, y1 = math.ceil(lx[inside].max() + span), math.ceil(ly[inside].max() + span)
        pixels = slide.read_level(level, x0, y0, x1 - x0, y1 - y0)
        for x, y in zip(lx[inside], ly[inside]):
            cut = pixels[round(y) - y0 : round(y) - y0 + factor * R, round(x) - x0 : round(x) - x0 + factor * R]
            if factor > 1:
                block_mean_uint8(cut, factor)
            done += 1
    slide.close()
    return done


def needed_tiles(path: str, origins: np.ndarray, step: float, level: int) -> list[int]:
    """Indices of the tiles of `level` that the regions' footprints touch."""
    with tifffile.TiffFile(path) as tiff:
        page = tiff.series[0].levels[level].keyframe
        tw, th, across = page.tilewidth, page.tilelength, math.ceil(page.imagewidth / page.tilewidth)
        ds = (tiff.series[0].levels[0].shape[1] / page.imagewidth + tiff.series[0].levels[0].shape[0] / page.imagelength) / 2
    span = step / ds
    tiles = set()
    for x, y in origins / ds:
        for ty in range(int(y) // th, int(math.ceil(y + span) - 1) // th + 1):
            for tx in range(int(x) // tw, int(math.ceil(x + span) - 1) // tw + 1):
                tiles.add(ty * across + tx)
    return sorted(tiles)


def ceiling_worker(path: str, tiles: list[int], level: int, n_regions: int) -> int:
    """Decode exactly `tiles` of `level` with imagecodecs (libjpeg-turbo); nothing else."""
    import imagecodecs

    with tifffile.TiffFile(path) as tiff:
        page = tiff.series[0].levels[level].keyframe
        offsets, counts, tables = page.dataoffsets, page.databytecounts, page.jpegtables
        colorspace = "YCBCR" if page.photometric == 6 else "RGB"
        fd = os.open(path, os.O_RDONLY)
        try:
            for t in tiles:
                imagecodecs.jpeg8_decode(os.pread(fd, counts[t], offsets[t]), tables=tables, colorspace=colorspace, outcolorspace="RGB")
        finally:
            os.close(fd)
    return n_regions


def pipeline_worker(row: ManifestRow, store: str, settings: ProcessSettings) -> int:
    result = process_slide(row, store, settings)
    if not result.ok:
        raise RuntimeError(result.failure.reason)
    return result.n_regions


REPEATS = 2  # rounds per figure (--repeats)


def timed(pool: ProcessPoolExecutor | None, function, jobs: list[tuple]) -> float:
    """Regions per second of one run of `jobs`, in this process (pool None) or one job per pool process."""
    started = time.perf_counter()
    if pool is None:
        done = sum(function(*job) for job in jobs)
    else:
        done = sum(f.result() for f in [pool.submit(function, *job) for job in jobs])
    return done / (time.perf_counter() - started)


def best_rates(pool, methods: dict[str, tuple], repeats: int = REPEATS) -> dict[str, float]:
    """Best of `repeats` rounds; each round runs every method once, in turn, so that a burst of
    load on the shared machine hits every method alike rather than one. A method is
    (function, jobs) or (function, jobs, runner): its own runner (a `CheckoutPool`) instead of `pool`."""
    best = dict.fromkeys(methods, 0.0)
    for _ in range(max(1, repeats)):
        for name, (function, jobs, *runner) in methods.items():
            best[name] = max(best[name], timed(runner[0] if runner else pool, function, jobs))
    return best


def _store(path: Path, magnification: float, target_mpp: float, *, dct: bool = False) -> str:
    shutil.rmtree(path, ignore_errors=True)
    create_store(path, StoreAttrs(
        magnification=magnification, mpp=target_mpp, region_size=R, min_foreground=0.5,
        codec=codec_settings("none"), segmentation=TissueSettings().to_json(), pipeline_version="bench",
        decode={"dct_scaled": dct},
    ))
    return str(path)


# ---------------------------------------------------------------- profile and driver

def profile_slide(path: str, target: float, repeats: int = 3) -> dict[str, float]:
    """Seconds per step of one slide through the direct pipeline's functions (best of `repeats`)."""
    best: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="pm-prof-"))
    for k in range(repeats):
        times = {}
        t = time.perf_counter()
        reader = open_reader(path)
        mpp0, _ = resolve_mpp(reader, None)
        source_fingerprint(path)
        times["open + MPP + fingerprint"] = time.perf_counter() - t
        t = time.perf_counter()
        tissue = segment_tissue(reader, mpp0, TissueSettings())
        times["segmentation"] = time.perf_counter() - t
        t = time.perf_counter()
        grid = region_grid(*reader.level_dimensions[0], mpp0, target, R, tissue, 0.5)
        level, factor = choose_level(reader.level_downsamples, target / mpp0)
        times["grid (foreground fractions)"] = time.perf_counter() - t
        t = time.perf_counter()
        regions = np.stack(list(iter_regions(reader, grid, level, R, resize_factor=factor)))
        times["extraction (decode + resize)"] = time.perf_counter() - t
        reader.close()
        store = _store(work / f"p{k}.zarr", 0.0, target)
        t = time.perf_counter()
        write_slide(store, "p", regions=iter(regions), n_regions=len(grid), coords=grid.coords, origin=grid.origin,
                    foreground=grid.foreground, attrs={"source_path": path, "fingerprint": "x"})
        times["writing + checksums + commit"] = time.perf_counter() - t
        best = {name: min(value, best.get(name, value)) for name, value in times.items()}
    shutil.rmtree(work, ignore_errors=True)
    return best


# ---------------------------------------------------------------- main

def _compare_pools(checkout: Path, slide: str, work: Path) -> dict:
    """{1: one worker, 2: two workers} tiling with `checkout`'s pipeline, each worker warmed
    by one slide at 5× and one at 10× (its first-use costs are not timed)."""
    from bench.checkout_pool import CheckoutPool

    pools = {1: CheckoutPool(checkout, 1), 2: CheckoutPool(checkout, 2)}
    row = ManifestRow(slide_id="w", path=slide)
    for n, checkout_pool in pools.items():
        for target in (2.0, 1.0):
            stores = [_store(work / f"warm-c{n}-{k}-{target}.zarr", 0.0, target) for k in range(n)]
            answers = [checkout_pool.submit(None, row, store, ProcessSettings(target_mpp=target, reader="direct"))
                       for store in stores]
            [answer.result() for answer in answers]
    print(f"comparing with the pipeline of {checkout}")
    return pools


def run_config(pool, slide_path: Path, magnification: float, args, work: Path, compare=None) -> list[tuple[str, float, float]]:
    """One slide at one magnification: the table of rates (see the module docstring).
    compare: {1: CheckoutPool, 2: CheckoutPool} timing another checkout's direct pipeline too."""
    target = {5.0: 2.0, 10.0: 1.0, 20.0: 0.5}[magnification]
    reader = open_reader(slide_path)
    mpp0, _ = resolve_mpp(reader, None)
    tissue = segment_tissue(reader, mpp0, TissueSettings())
    grid = region_grid(*reader.level_dimensions[0], mpp0, target, R, tissue, 0.5)
    level, factor = choose_level(reader.level_downsamples, target / mpp0)
    downsamples = tuple(round(d) for d in reader.level_downsamples)
    reader.close()
    path, n = str(slide_path), len(grid)
    pick = np.linspace(0, n - 1, min(n, args.clam_regions)).astype(int)
    tiles = needed_tiles(path, grid.origin, grid.step, level)
    print(f"\n{slide_path.name} (levels {'/'.join(map(str, downsamples))}) at {magnification:g}× ({target} µm/px): "
          f"{n} regions, reading level {level} (downsample {downsamples[level]}, resize factor {factor:g}), "
          f"{len(tiles)} tiles of 256² decoded by the ceiling")
    rows = [ManifestRow(slide_id=f"s{k}", path=path) for k in range(2)]
    results = []
    for procs in (1, 2):
        runner = None if procs == 1 else pool
        copies = range(procs)
        methods = {
            "TRIDENT-style best level + area resize": (trident_worker, [(path, grid.origin, grid.step)] * procs),
            "CLAM-style level 0 + resize": (clam_worker, [(path, grid.origin[pick], grid.step)] * procs),
            "OpenSlide block read + slice": (block_worker, [(path, grid.origin, grid.step, level)] * procs),
            "decode ceiling (imagecodecs, needed tiles)": (ceiling_worker, [(path, tiles, level, n)] * procs),
        }
        for variant, (name, settings) in enumerate((
            ("pipeline, direct reader", ProcessSettings(target_mpp=target, reader="direct")),
            ("pipeline, openslide reader", ProcessSettings(target_mpp=target, reader="openslide")),
            ("pipeline, direct + DCT-scaled (inexact)", ProcessSettings(target_mpp=target, reader="direct", scaled_decode=True)),
        )):
            if settings.scaled_decode and factor < 2:
                continue
            store = _store(work / f"{slide_path.stem}-{magnification:g}-{variant}-{procs}.zarr", magnification, target,
                           dct=settings.scaled_decode)
            methods[name] = (pipeline_worker, [(rows[k], store, settings) for k in copies])
            if compare and settings.reader == "direct" and not settings.scaled_decode:
                store = _store(work / f"{slide_path.stem}-{magnification:g}-c{variant}-{procs}.zarr", magnification, target)
                methods[f"pipeline, direct reader ({args.compare_label})"] = (
                    pipeline_worker, [(rows[k], store, settings) for k in copies], compare[procs])
        rates = best_rates(runner, methods, args.repeats)
        base, ceiling = rates["TRIDENT-style best level + area resize"], rates["decode ceiling (imagecodecs, needed tiles)"]
        print(f"  {procs} process{'es' if procs > 1 else ''}: {'method':44s} {'regions/s':>9s} {'× TRIDENT':>9s} {'% ceiling':>9s}")
        for name, rate in rates.items():
            print(f"  {'':12s}{name:44s} {rate:9.0f} {rate / base:9.2f} {rate / ceiling:9.0%}")
            results.append((f"{procs}p {name}", rate / base, rate / ceiling))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="bench slides' side in level-0 px (multiple of 256)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--clam-regions", type=int, default=24, help="regions the CLAM-style reader reads (evenly spread)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="rounds per figure (best of)")
    parser.add_argument("--quick", action="store_true", help="only slide A at 10× (a smoke run)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="a checkout (folder holding pipeline/) whose direct pipeline is timed side by side, "
                             "e.g. `git archive HEAD~3 pipeline | tar -x -C /tmp/before`")
    parser.add_argument("--compare-label", default="compare", help="its rows' label")
    args = parser.parse_args()

    slide_a = make_bench_slide(args.out / f"bench_a_{args.size}.tif", args.size, downsamples=(1, 4, 16))
    slide_b = make_bench_slide(args.out / f"bench_b_{args.size}.tif", args.size, downsamples=(1, 2, 4, 16))
    configs = [(slide_a, 10.0)] if args.quick else [(slide_a, 5.0), (slide_a, 10.0), (slide_a, 20.0), (slide_b, 5.0)]
    print(f"bench slides {args.size}² px at {MPP0} µm/px, JPEG q85 256² tiles; cpus {os.cpu_count()} "
          f"(shared: read the ratios); R = {R}")
    work = Path(tempfile.mkdtemp(prefix="pm-bench-", dir=args.out))
    started = time.perf_counter()
    try:
        compare = _compare_pools(args.compare, str(slide_a), work) if args.compare else None
        try:
            with ProcessPoolExecutor(2) as pool:
                list(pool.map(_warm, [str(slide_a)] * 2))
                _warm(str(slide_a))
                for slide_path, magnification in configs:
                    run_config(pool, slide_path, magnification, args, work, compare)
        finally:
            for checkout_pool in (compare or {}).values():
                checkout_pool.close()

        print("\nper-slide profile, direct reader, best of 3 (s):")
        for magnification, target in ((5.0, 2.0), (10.0, 1.0)):
            steps = profile_slide(str(slide_a), target)
            print(f"  {slide_a.name} {magnification:g}×: " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
                  + f"; total {sum(steps.values()):.3f}")

        manifest = work / "manifest.csv"
        copies = [work / f"copy{k}_{slide_a.name}" for k in range(2)]  # a manifest lists a file once
        for copy in copies:
            shutil.copyfile(slide_a, copy)
        manifest.write_text("slide_id,path\n" + "".join(f"s{k},{copy}\n" for k, copy in enumerate(copies)))
        print(f"\ndriver wall time, 2 copies of {slide_a.name} at 10× (build_store, incl. reconcile and table writes):")
        for workers in (0, 2):
            out = work / f"driver-{workers}.zarr"
            t = time.perf_counter()
            summary = build_store(manifest, out, magnification=10.0, workers=workers, progress=False)
            assert summary.ok, summary.format()
            print(f"  workers={workers}: {time.perf_counter() - t:.2f} s ({summary.n_regions} regions)"
                  + ("  [includes the local Dask cluster's start]" if workers else "  [in process]"))
        t = time.perf_counter()
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=40) as cluster:
            with Client(cluster):
                pass
        print(f"  a local 2-process Dask cluster alone starts and stops in {time.perf_counter() - t:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
