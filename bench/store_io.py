"""Benchmark: tile store write and read speed and bytes per region, for each codec.

Region content is real tissue: 224×224 crops of the real sample slide at level 0
(20×), repeated to `--regions` per slide. Timings are wall-clock on this machine,
single process, warm page cache (after the write), so they measure decode cost,
not disk speed.

    python bench/store_io.py                          # 2,000 regions, data/sample/cmu_small_region.svs
    python bench/store_io.py --regions 500 --slide path/to/slide.svs
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import reconcile
from pipeline.schema.format import StoreAttrs
from pipeline.schema.reader import open_store
from pipeline.store_writer import create_store, write_slide

R = 224


def tissue_crops(slide_path: str, n: int) -> np.ndarray:
    """`(n, 224, 224, 3) uint8` crops of the slide's level 0 with ≥ 20 % tissue, cycled."""
    from pipeline.slide import open_slide, read_rgb

    slide = open_slide(slide_path)
    width, height = slide.level_dimensions[0]
    image = read_rgb(slide, (0, 0), 0, (width, height))
    slide.close()
    crops = [
        image[y : y + R, x : x + R]
        for y in range(0, height - R + 1, R)
        for x in range(0, width - R + 1, R)
    ]
    tissue = [c for c in crops if (c.min(axis=2) < 200).mean() >= 0.2]
    return np.stack([tissue[i % len(tissue)] for i in range(n)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def bench_codec(root: Path, codec: str, regions: np.ndarray) -> dict:
    store = root / f"{codec}.zarr"
    create_store(store, StoreAttrs(
        magnification=20.0, mpp=0.5, region_size=R, min_foreground=0.5, codec=codec_settings(codec),
        segmentation={}, pipeline_version="bench",
    ))
    n = len(regions)
    coords = np.stack([np.arange(n) // 64, np.arange(n) % 64], axis=1)
    started = time.perf_counter()
    write_slide(store, "s", regions=iter(regions), n_regions=n, coords=coords, origin=coords * R,
                foreground=np.ones(n), attrs={"source_path": "bench", "fingerprint": "bench"})
    write_s = time.perf_counter() - started
    reconcile(store)
    stored = sum(p.stat().st_size for p in (store / "slides/s/regions").rglob("*") if p.is_file())
    opened = open_store(store)
    started = time.perf_counter()
    whole = np.array(opened.read_slide("s").regions[:])  # a fresh store handle per slide, as a loader does
    read_all_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    picks = rng.integers(0, n, 200)
    lazy = opened.read_slide("s").regions
    started = time.perf_counter()
    for i in picks:
        np.array(lazy[int(i)])
    random_s = (time.perf_counter() - started) / len(picks)
    return {
        "codec": codec, "regions_per_s_write": n / write_s, "regions_per_s_read_slide": n / read_all_s,
        "ms_per_random_region": 1e3 * random_s, "bytes_per_region": stored / n,
        "ratio_vs_raw": regions.nbytes / stored, "psnr_db": psnr(whole, regions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default="data/sample/cmu_small_region.svs")
    parser.add_argument("--regions", type=int, default=2000)
    parser.add_argument("--codecs", nargs="+", default=["none", "zstd", "jpeg"])
    args = parser.parse_args()
    regions = tissue_crops(args.slide, args.regions)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {len(regions)} regions of {R}×{R} "
          f"real tissue ({regions.nbytes / 2**20:.0f} MiB raw), one slide per codec")
    print(f"{'codec':6} {'write reg/s':>11} {'read slide reg/s':>16} {'random ms/reg':>13} {'bytes/reg':>10} {'× smaller':>9} {'PSNR dB':>8}")
    root = Path(tempfile.mkdtemp(prefix="store-io-"))
    try:
        for codec in args.codecs:
            r = bench_codec(root, codec, regions)
            print(f"{r['codec']:6} {r['regions_per_s_write']:11.0f} {r['regions_per_s_read_slide']:16.0f} "
                  f"{r['ms_per_random_region']:13.3f} {r['bytes_per_region']:10.0f} {r['ratio_vs_raw']:9.2f} "
                  f"{r['psnr_db']:8.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
