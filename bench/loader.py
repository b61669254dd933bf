"""Loader throughput: slides/s and regions/s of every way the trainer can get a slide's regions.

Builds (once, cached under bench/out/loader/) a cohort of synthetic slides whose
regions are 224×224 crops of the real sample slide (so JPEG sizes are realistic),
written three times as tile stores (codec none / zstd / jpeg) and once as
pyramidal JPEG-compressed TIFFs (one mosaic per slide, for OpenSlide cutting at
training time). Then, in one run, it times on a warm page cache:

- a plain `np.memmap` read of each `none` chunk file (the baseline);
- `TileStoreDataset` on each codec, in process and through a DataLoader with 1 and 2 workers;
- OpenSlide `read_region` of the same regions from the TIFFs (in process, 2 workers).

Every sample's regions are copied into one reused contiguous buffer (the
"touch"), baseline included, so lazy paths are not flattered. Each method runs
over the same shuffled slide order until it has read every slide or spent its
share of `--seconds`, in three rounds of rotated order; the best round counts
(the machine is shared and noisy). torch runs one thread in the main process.

Run: .venv/bin/python bench/loader.py [--slides 300] [--seconds 15] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.schema.codecs import codec_settings, decode_jpeg
from pipeline.schema.commit import read_table, reconcile
from pipeline.schema.format import SLIDE_TABLE, StoreAttrs
from pipeline.schema.reader import open_store
from pipeline.store_writer import create_store, write_slide
from trainer.data.tile_dataset import TileStoreDataset, collate_slide

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = ROOT / "data" / "sample" / "cmu_small_region.svs"
MOSAIC_COLUMNS = 8


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """slides: cohort size; regions per slide uniform in [min_regions, max_regions];
    region_size: R px; seconds: time budget per method, split over `rounds` rotated rounds
    (the best round counts); out: cache folder."""

    slides: int = 300
    min_regions: int = 4
    max_regions: int = 40
    region_size: int = 224
    pool: int = 256
    seed: int = 0
    seconds: float = 15.0
    rounds: int = 3
    out: Path = ROOT / "bench" / "out" / "loader"


@dataclass(frozen=True, kw_only=True)
class Result:
    method: str
    slides: int
    regions: int
    seconds: float

    @property
    def slides_per_s(self) -> float:
        return self.slides / self.seconds

    @property
    def regions_per_s(self) -> float:
        return self.regions / self.seconds


# --- the cohort -------------------------------------------------------------


def region_pool(config: BenchConfig) -> np.ndarray:
    """(pool, R, R, 3) uint8 tissue crops of the real slide (20×), randomly flipped/rotated."""
    if not SAMPLE_SLIDE.exists():
        sys.exit(f"the sample slide {SAMPLE_SLIDE} is missing; fetch it first (see README: make setup)")
    rng = np.random.default_rng(config.seed)
    size = config.region_size
    with openslide.OpenSlide(str(SAMPLE_SLIDE)) as slide:
        width, height = slide.dimensions
        picture = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    crops: list[np.ndarray] = []
    while len(crops) < config.pool:
        y, x = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
        crop = picture[y : y + size, x : x + size]
        if crop.mean() < 215:  # mostly tissue, like a kept region
            crops.append(np.rot90(crop, int(rng.integers(4)))[:, :: 1 - 2 * int(rng.integers(2))])
    return np.ascontiguousarray(np.stack(crops))


def cohort_plan(config: BenchConfig) -> list[tuple[str, np.ndarray]]:
    """[(slide_id, pool indices of its regions)], reproducible from the seed."""
    rng = np.random.default_rng(config.seed + 1)
    plan = []
    for i in range(config.slides):
        n = int(rng.integers(config.min_regions, config.max_regions + 1))
        plan.append((f"slide_{i:04d}", rng.integers(0, config.pool, size=n)))
    return plan


def grid_coords(n: int) -> np.ndarray:
    """Row-major (row, col) of n regions on a MOSAIC_COLUMNS-wide grid: (n, 2) int32."""
    index = np.arange(n)
    return np.stack([index // MOSAIC_COLUMNS, index % MOSAIC_COLUMNS], axis=1).astype(np.int32)


def build_store(path: Path, codec: str, plan: list[tuple[str, np.ndarray]], pool: np.ndarray, config: BenchConfig) -> Path:
    """The cohort as a tile store (skipped when the table already lists every slide)."""
    if (path / SLIDE_TABLE).exists() and len(read_table(path).slides) == len(plan):
        return path
    size = config.region_size
    create_store(path, StoreAttrs(
        magnification=20.0, mpp=0.5, region_size=size, min_foreground=0.5, codec=codec_settings(codec),
        segmentation={"method": "bench"}, pipeline_version="bench",
    ))
    done = set(read_table(path).slides)
    for slide_id, picks in plan:
        if slide_id in done:
            continue
        coords = grid_coords(len(picks))
        write_slide(
            path, slide_id, regions=(pool[k] for k in picks), n_regions=len(picks), coords=coords,
            origin=coords[:, ::-1].astype(np.int64) * size, foreground=np.ones(len(picks), np.float32),
            attrs={"source_path": f"{slide_id}.tiff", "fingerprint": slide_id, "label": str(len(picks) % 2),
                   "mpp_source": "bench", "grid_shape": [int(coords[-1, 0]) + 1, MOSAIC_COLUMNS]},
        )
    reconcile(path)
    return path


def build_tiffs(folder: Path, plan: list[tuple[str, np.ndarray]], pool: np.ndarray, config: BenchConfig) -> list[Path]:
    """Each slide as a pyramidal tiled TIFF (JPEG q90 tiles, 256 px, levels 1 and 2) holding a
    mosaic of its regions on a white background, MOSAIC_COLUMNS regions per row."""
    folder.mkdir(parents=True, exist_ok=True)
    size = config.region_size
    paths = []
    for slide_id, picks in plan:
        path = folder / f"{slide_id}.tiff"
        paths.append(path)
        if path.exists():
            continue
        rows = math.ceil(len(picks) / MOSAIC_COLUMNS)
        mosaic = np.full((rows * size, MOSAIC_COLUMNS * size, 3), 255, np.uint8)
        for (row, col), k in zip(grid_coords(len(picks)), picks):
            mosaic[row * size : (row + 1) * size, col * size : (col + 1) * size] = pool[k]
        aside = path.with_suffix(".tmp")
        with tifffile.TiffWriter(aside) as tiff:
            for index, level in enumerate((mosaic, mosaic[::2, ::2])):
                px_per_cm = 1e4 / (0.5 * 2**index)
                tiff.write(
                    level, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                    subfiletype=0 if index == 0 else 1, resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER", metadata=None,
                )
        os.replace(aside, path)
    return paths


# --- what is timed --------------------------------------------------------------


class Toucher:
    """Reads every byte of a sample: a copy into one reused contiguous buffer (as a pinned
    staging buffer would be), so page faults of a fresh allocation do not dominate."""

    def __init__(self, max_regions: int, size: int) -> None:
        self.buffer = torch.empty((max_regions, size, size, 3), dtype=torch.uint8)

    def __call__(self, regions: torch.Tensor) -> int:
        n = int(regions.shape[0])
        self.buffer[:n].copy_(regions)
        return n


def timed(method: str, samples: Iterable[torch.Tensor], seconds: float, touch: Toucher) -> Result:
    """Touch samples until exhausted or `seconds` passed; the first sample (start-up) is not timed."""
    iterator = iter(samples)
    touch(next(iterator))
    slides = regions = 0
    start = time.perf_counter()
    for regions_tensor in iterator:
        regions += touch(regions_tensor)
        slides += 1
        if time.perf_counter() - start > seconds:
            break
    return Result(method=method, slides=slides, regions=regions, seconds=time.perf_counter() - start)


def plain_memmap(store: Path, plan: dict[str, int], order: list[str], size: int) -> Iterator[torch.Tensor]:
    """Baseline: np.memmap each `none` chunk file directly (no reader, no zarr)."""
    for slide_id in order:
        chunk = store / "slides" / slide_id / "regions" / "c" / "0" / "0" / "0" / "0"
        yield torch.from_numpy(np.memmap(chunk, dtype=np.uint8, mode="c", shape=(plan[slide_id], size, size, 3)))


def memmap_mode(store: Path, plan: dict[str, int], order: list[str], size: int, mode: str) -> Iterator[torch.Tensor]:
    """np.memmap in `mode` ("r": read-only, torch warns; "c": copy-on-write) → torch.from_numpy."""
    import warnings

    for slide_id in order:
        chunk = store / "slides" / slide_id / "regions" / "c" / "0" / "0" / "0" / "0"
        mapped = np.memmap(chunk, dtype=np.uint8, mode=mode, shape=(plan[slide_id], size, size, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield torch.from_numpy(mapped)


def through_dataset(dataset: Dataset, order: list[int]) -> Iterator[torch.Tensor]:
    for index in order:
        yield dataset[index]["regions"]


def through_loader(dataset: Dataset, order: list[int], workers: int) -> Iterator[torch.Tensor]:
    loader = DataLoader(
        dataset, batch_size=1, sampler=order, num_workers=workers, collate_fn=collate_slide,
        prefetch_factor=4, multiprocessing_context=multiprocessing.get_context("fork"),
    )
    for sample in loader:
        yield sample["regions"]


def reader_only(store: Path, order: list[str]) -> Iterator[torch.Tensor]:
    """`open_store(...).read_slide` without touching the regions (per-slide reader overhead)."""
    opened = open_store(store)
    for slide_id in order:
        opened.read_slide(slide_id)
        yield torch.empty((0, 1, 1, 3), dtype=torch.uint8)


def raw_shard_decode(store: Path, plan: dict[str, int], order: list[str], size: int) -> Iterator[torch.Tensor]:
    """The codec alone: read a slide's shard file, decode each region with imagecodecs (no zarr).

    Shard layout (zarr sharding_indexed, index at the end): n × (offset, length) little-endian
    uint64 pairs followed by a 4-byte crc32c.
    """
    for slide_id in order:
        n = plan[slide_id]
        data = (store / "slides" / slide_id / "regions" / "c" / "0" / "0" / "0" / "0").read_bytes()
        index = np.frombuffer(data, dtype="<u8", count=2 * n, offset=len(data) - 16 * n - 4).reshape(n, 2)
        regions = np.empty((n, size, size, 3), np.uint8)
        for i, (offset, length) in enumerate(index.tolist()):
            regions[i] = decode_jpeg(data[offset : offset + length], (size, size, 3))
        yield torch.from_numpy(regions)


class OpenSlideRegions(Dataset):
    """Training-time tiling: read each region with OpenSlide `read_region` at level 0.

    Handles are opened per process on first use and kept (an LRU would bound them).
    """

    def __init__(self, paths: list[Path], counts: list[int], size: int) -> None:
        self.paths, self.counts, self.size = [str(p) for p in paths], counts, size
        self._handles: dict[tuple[int, str], openslide.OpenSlide] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = (os.getpid(), self.paths[index])
        slide = self._handles.get(key) or self._handles.setdefault(key, openslide.OpenSlide(self.paths[index]))
        regions = np.empty((self.counts[index], self.size, self.size, 3), np.uint8)
        for i, (row, col) in enumerate(grid_coords(self.counts[index])):
            rgba = slide.read_region((int(col) * self.size, int(row) * self.size), 0, (self.size, self.size))
            regions[i] = np.asarray(rgba)[..., :3]
        return {"regions": torch.from_numpy(regions), "index": index}


# --- the run -----------------------------------------------------------------------


def run(config: BenchConfig) -> tuple[list[Result], dict[str, Any]]:
    started = time.perf_counter()
    pool = region_pool(config)
    plan = cohort_plan(config)
    stores = {codec: build_store(config.out / f"{codec}.zarr", codec, plan, pool, config) for codec in ("none", "zstd", "jpeg")}
    tiffs = build_tiffs(config.out / "tiffs", plan, pool, config)
    print(f"cohort ready in {time.perf_counter() - started:.0f} s", flush=True)
    counts = {slide_id: len(picks) for slide_id, picks in plan}
    order = np.random.default_rng(config.seed + 2).permutation(len(plan)).tolist()
    ids = [plan[i][0] for i in order]
    size, budget = config.region_size, config.seconds
    datasets = {codec: TileStoreDataset(path, min_regions=0, max_regions=10**6) for codec, path in stores.items()}
    assert all(ds.slide_ids == [s for s, _ in plan] for ds in datasets.values())
    list(plain_memmap(stores["none"], counts, ids, size))  # warm the page cache for both memmap paths
    methods: list[tuple[str, Callable[[], Iterable[torch.Tensor]]]] = [
        ("numpy memmap (baseline)", lambda: plain_memmap(stores["none"], counts, ids, size)),
        ("numpy memmap mode r + from_numpy", lambda: memmap_mode(stores["none"], counts, ids, size, "r")),
        ("reader read_slide only (none)", lambda: reader_only(stores["none"], ids)),
        ("TileStoreDataset none (memmap)", lambda: through_dataset(datasets["none"], order)),
        ("TileStoreDataset none, 2 workers", lambda: through_loader(datasets["none"], order, 2)),
        ("TileStoreDataset zstd", lambda: through_dataset(datasets["zstd"], order)),
        ("TileStoreDataset zstd, 1 worker", lambda: through_loader(datasets["zstd"], order, 1)),
        ("TileStoreDataset zstd, 2 workers", lambda: through_loader(datasets["zstd"], order, 2)),
        ("raw shard decode jpeg (no zarr)", lambda: raw_shard_decode(stores["jpeg"], counts, ids, size)),
        ("TileStoreDataset jpeg", lambda: through_dataset(datasets["jpeg"], order)),
        ("TileStoreDataset jpeg, 1 worker", lambda: through_loader(datasets["jpeg"], order, 1)),
        ("TileStoreDataset jpeg, 2 workers", lambda: through_loader(datasets["jpeg"], order, 2)),
    ]
    openslide_ds = OpenSlideRegions([tiffs[i] for i in range(len(plan))], [counts[s] for s, _ in plan], size)
    methods += [
        ("OpenSlide read_region (JPEG TIFF)", lambda: through_dataset(openslide_ds, order)),
        ("OpenSlide read_region, 2 workers", lambda: through_loader(openslide_ds, order, 2)),
    ]
    touch = Toucher(config.max_regions, size)
    best: dict[str, Result] = {}
    for round_ in range(config.rounds):  # rotated order: load spikes do not always hit the same method
        for name, make in methods[round_:] + methods[:round_]:
            result = timed(name, make(), budget / config.rounds, touch)
            if name not in best or result.regions_per_s > best[name].regions_per_s:
                best[name] = result
            print(f"round {round_}  {name:38s} {result.slides_per_s:9.1f} slides/s {result.regions_per_s:10.0f} regions/s",
                  flush=True)
    results = [best[name] for name, _ in methods]
    sizes = {codec: _folder_bytes(path / "slides") for codec, path in stores.items()}
    sizes["tiff"] = sum(p.stat().st_size for p in tiffs)
    info = {"regions": sum(counts.values()), "sizes": sizes, "order": "shuffled"}
    return results, info


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import zarr

    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__}, zarr {zarr.__version__}, OpenSlide {openslide.__library_version__}"
    )


def table(results: list[Result]) -> str:
    baseline = results[0].regions_per_s
    lines = ["| method | slides/s | regions/s | vs baseline |", "| --- | ---: | ---: | ---: |"]
    for r in results:
        if r.regions:
            lines.append(f"| {r.method} | {r.slides_per_s:.1f} | {r.regions_per_s:,.0f} | {r.regions_per_s / baseline:.2f}× |")
        else:
            lines.append(f"| {r.method} | {r.slides_per_s:.1f} | – | – |")
    return "\n".join(lines)


def docs_section(results: list[Result], info: dict[str, Any], config: BenchConfig, command: str) -> str:
    rate = {r.method: r.regions_per_s for r in results}
    slides = {r.method: r.slides_per_s for r in results}
    base = rate["numpy memmap (baseline)"]
    mib = {k: v / 2**20 for k, v in info["sizes"].items()}
    return "\n".join([
        "## Loader throughput",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}.",
        f"Command: `{command}`",
        "",
        f"Cohort: {config.slides} synthetic slides, {config.min_regions}–{config.max_regions} regions each "
        f"({info['regions']:,} regions of {config.region_size}×{config.region_size} px cut from the real CMU-1 "
        f"slide), read in a shuffled order on a warm page cache; each method runs for at most "
        f"{config.seconds:g} s in {config.rounds} rotated rounds, best round reported. Stored bytes: "
        f"none {mib['none']:.0f} MiB, zstd {mib['zstd']:.0f} MiB, jpeg q90 {mib['jpeg']:.0f} MiB, "
        f"pyramidal JPEG TIFFs {mib['tiff']:.0f} MiB. Every sample is copied into a reused contiguous "
        "buffer (baseline too). Single runs on a cloud VM: "
        "read the timings as ±20 %.",
        "",
        table(results),
        "",
        f"- Memory-mapped path: {base / rate['TileStoreDataset none (memmap)']:.2f}× the baseline's time per "
        "region (target ≤ 1.5×).",
        f"- JPEG path, 1 DataLoader worker: {rate['TileStoreDataset jpeg, 1 worker']:,.0f} regions/s "
        "(target ≥ 1,000 per worker); the codec alone (`raw shard decode`, imagecodecs on the shard's "
        f"bytes, no zarr): {rate['raw shard decode jpeg (no zarr)']:,.0f} regions/s.",
        f"- `reader read_slide only`: {slides['reader read_slide only (none)']:.0f} slides/s, i.e. "
        f"{1e3 / slides['reader read_slide only (none)']:.1f} ms per slide for `open_store(...).read_slide` "
        "without touching the regions (the table row + the coords/origin/foreground arrays read "
        "as raw chunks): the fixed per-slide cost on top of the baseline.",
        f"- Read-only map (`mode r`) vs copy-on-write (`mode c`, the baseline and the dataset): "
        f"{rate['numpy memmap mode r + from_numpy'] / base:.2f}× the rate.",
        "- With workers, a sample crosses to the main process through shared memory (one copy); "
        "workers and the main process share the 2 cores.",
        "",
    ])


def write_docs(section: str, path: Path) -> None:
    """Replace (or append) the '## Loader throughput' section of docs/benchmarks.md."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Loader throughput"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n") + "\n"
    path.write_text(new if new.endswith("\n") else new + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=BenchConfig.slides, help="cohort size (cached per size)")
    parser.add_argument("--seconds", type=float, default=BenchConfig.seconds, help="time budget per method")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md 'Loader throughput'")
    args = parser.parse_args(argv)
    config = BenchConfig(slides=args.slides, seconds=args.seconds, out=BenchConfig.out / f"cohort{args.slides}")
    torch.set_num_threads(1)
    results, info = run(config)
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT) if Path(sys.argv[0]).is_absolute() else sys.argv[0]), *sys.argv[1:]])
    print()
    print(table(results))
    if args.write_docs:
        write_docs(docs_section(results, info, config, command), ROOT / "docs" / "benchmarks.md")
        print(f"\nwrote the 'Loader throughput' section of {ROOT / 'docs' / 'benchmarks.md'}")
    print(json.dumps({r.method: round(r.regions_per_s) for r in results}))


if __name__ == "__main__":
    main()
