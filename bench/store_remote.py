"""Benchmark: a store served over HTTP and S3 (loopback) vs local disk; staging and verify speed.

Cohort: `--slides` slides of `--regions` real-tissue 224×224 regions (crops of the sample
slide), one store per codec (`none`, `jpeg`). Servers run in their own processes on
127.0.0.1 (so they do not share the client's GIL): a static HTTP server with byte-range
support (as nginx or any object store serves files) and moto's S3 server (`python -m
moto.server`, an in-memory Python emulator: far slower per request than real S3). Warm
caches, loopback interface: it measures protocol and client overhead, not a network.

- loader: `TileStoreDataset` samples (decoded uint8 tensors), shuffled, ≤ `--seconds` per row;
- stage: `pm-tiles stage` of the jpeg store to local disk, kept (`jpeg`) and transcoded (`--codec none`);
- verify: `pm-tiles verify`, stored MB hashed per second.

    python bench/store_remote.py                     # 16 slides × 24 regions
"""

from __future__ import annotations

import argparse
import http.server
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from store_io import R, tissue_crops  # noqa: E402

from pipeline.schema.codecs import codec_settings  # noqa: E402
from pipeline.schema.commit import reconcile  # noqa: E402
from pipeline.schema.format import StoreAttrs  # noqa: E402
from pipeline.stage import stage_store  # noqa: E402
from pipeline.store_writer import create_store, write_slide  # noqa: E402
from pipeline.verify import verify_store  # noqa: E402


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte ranges (`Range: bytes=a-b`), which zarr's shard reads use."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not header or not header.startswith("bytes=") or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, _, last = header[len("bytes="):].partition("-")
        start = size - int(last) if first == "" else int(first)
        end = size - 1 if first == "" or last == "" else min(int(last), size - 1)
        handle = open(path, "rb")  # noqa: SIM115 — copyfile reads it, then the server closes it
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(handle, end - start + 1)


class _Limited:
    def __init__(self, handle, remaining: int) -> None:
        self.handle, self.remaining = handle, remaining

    def read(self, n: int = -1) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        data = self.handle.read(n)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_cohort(root: Path, codec: str, crops: np.ndarray, slides: int, regions: int) -> Path:
    store = root / f"{codec}.zarr"
    create_store(store, StoreAttrs(magnification=20.0, mpp=0.5, region_size=R, min_foreground=0.5,
                                   codec=codec_settings(codec), segmentation={}, pipeline_version="bench"))
    for s in range(slides):
        picked = crops[(np.arange(regions) * 7 + s * 3) % len(crops)]
        coords = np.stack([np.arange(regions) // 8, np.arange(regions) % 8], axis=1)
        write_slide(store, f"s{s:03d}", regions=iter(picked), n_regions=regions, coords=coords, origin=coords * R,
                    foreground=np.ones(regions), attrs={"source_path": "bench", "fingerprint": f"f{s}",
                                                        "label": "A" if s % 2 else "B"})
    reconcile(store)
    return store


def loader_rate(url: str, seconds: float, storage_options=None) -> tuple[float, float, float]:
    """(slides/s, regions/s, MB/s of decoded regions) of TileStoreDataset over `url`."""
    from trainer.data.tile_dataset import TileStoreDataset

    dataset = TileStoreDataset(url, min_regions=1)
    order = np.random.default_rng(0).permutation(len(dataset))
    dataset[0]  # open the reader outside the timing
    slides = regions = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for index in order:
            sample = dataset[int(index)]
            slides += 1
            regions += int(sample["regions"].shape[0])
            if time.perf_counter() - started >= seconds:
                break
    elapsed = time.perf_counter() - started
    return slides / elapsed, regions / elapsed, regions * R * R * 3 / 1e6 / elapsed


def serve_http(folder: str, port: int) -> None:
    handler = lambda *a, **k: RangeHandler(*a, directory=folder, **k)  # noqa: E731
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"no server on port {port}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-http":
        serve_http(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--regions", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--slide", default="data/sample/cmu_small_region.svs")
    args = parser.parse_args()
    import subprocess

    crops = tissue_crops(args.slide, 64)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        stores = {codec: build_cohort(root, codec, crops, args.slides, args.regions) for codec in ("none", "jpeg")}
        sizes = {codec: sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) for codec, store in stores.items()}
        http_port, port = free_port(), free_port()
        httpd = subprocess.Popen([sys.executable, __file__, "--serve-http", str(root), str(http_port)])
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(http_port)
        wait_for_port(port)
        http_base = f"http://127.0.0.1:{http_port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        for codec, store in stores.items():
            fs.put(str(store), f"bench/{codec}.zarr", recursive=True)
        try:
            rows = []
            for codec in ("none", "jpeg"):
                for where, url in (("local", str(stores[codec])), ("HTTP", f"{http_base}/{codec}.zarr"),
                                   ("S3", f"s3://bench/{codec}.zarr")):
                    rows.append((codec, where, *loader_rate(url, args.seconds)))
            stage_rows = []
            for where, url in (("local", str(stores["jpeg"])), ("HTTP", f"{http_base}/jpeg.zarr"),
                               ("S3", "s3://bench/jpeg.zarr")):
                for codec in (None, "none"):
                    target = root / f"staged-{where}-{codec}.zarr"
                    summary = stage_store(url, target, codec=codec)
                    assert summary.ok, summary.format()
                    stage_rows.append((where, codec or "jpeg (kept)", summary.bytes_read / 1e6 / summary.seconds,
                                       args.slides / summary.seconds))
            verify_rows = []
            for codec in ("none", "jpeg"):
                for where, url in (("local", str(stores[codec])), ("HTTP", f"{http_base}/{codec}.zarr"),
                                   ("S3", f"s3://bench/{codec}.zarr")):
                    report = verify_store(url)
                    assert report.ok
                    verify_rows.append((codec, where, report.bytes_read / 1e6 / report.seconds,
                                        report.n_slides / report.seconds))
        finally:
            for server in (moto, httpd):
                server.terminate()
                server.wait(timeout=30)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.slides} slides × {args.regions} regions of {R}×{R} px; stores: none {sizes['none'] / 1e6:.1f} MB, "
          f"jpeg {sizes['jpeg'] / 1e6:.1f} MB")
    print("\nTraining loader (TileStoreDataset, 0 workers, shuffled slides)\n")
    print("| codec | store on | slides/s | regions/s | decoded MB/s | vs local |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    local = {}
    for codec, where, slides, regions, mbs in rows:
        local.setdefault(codec, regions)
        print(f"| {codec} | {where} | {slides:.1f} | {regions:,.0f} | {mbs:.0f} | {regions / local[codec]:.2f}× |")
    print("\nStaging (`pm-tiles stage` of the jpeg store)\n")
    print("| from | local codec | source MB/s | slides/s |")
    print("| --- | --- | ---: | ---: |")
    for where, codec, mbs, rate in stage_rows:
        print(f"| {where} | {codec} | {mbs:.1f} | {rate:.1f} |")
    print("\nVerify (`pm-tiles verify`, stored bytes hashed, regions decoded)\n")
    print("| codec | store on | MB/s | slides/s |")
    print("| --- | --- | ---: | ---: |")
    for codec, where, mbs, rate in verify_rows:
        print(f"| {codec} | {where} | {mbs:.1f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
