"""Small tile stores with synthetic regions, for the store layer's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.schema.codecs import codec_settings
from pipeline.schema.format import StoreAttrs
from pipeline.store_writer import create_store, write_slide

REGION = 16


def store_attrs(codec: str = "none", *, region_size: int = REGION, **settings) -> StoreAttrs:
    return StoreAttrs(
        magnification=5.0, mpp=2.0, region_size=region_size, min_foreground=0.5,
        codec=codec_settings(codec, **settings), segmentation={"method": "test"}, pipeline_version="0.1.0",
    )


def smooth_regions(n: int, size: int = REGION, seed: int = 0) -> np.ndarray:
    """`(n, size, size, 3) uint8` smooth gradients plus mild noise (JPEG-friendly content)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        base = rng.uniform(60, 200, 3)
        slope = rng.uniform(-40, 40, (2, 3))
        image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 2, (size, size, 3))
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def write_example_slide(store: Path, slide_id: str, regions: np.ndarray, **attrs) -> dict:
    n = len(regions)
    cols = 4
    coords = np.stack([np.arange(n) // cols, np.arange(n) % cols], axis=1)
    return write_slide(
        store, slide_id, regions=iter(regions), n_regions=n, coords=coords, origin=coords[:, ::-1] * 64,
        foreground=np.linspace(0.5, 1.0, n), attrs={
            "source_path": f"/data/{slide_id}.svs", "fingerprint": f"fp-{slide_id}", "mpp_source": "slide",
            "grid_shape": [max(1, (n + cols - 1) // cols), cols], "label": "A", "split": "train",
            "case_id": "c1", "extra": {"site": "x"}, **attrs,
        },
    )


def make_store(path: Path, codec: str = "none", slides: dict[str, int] | None = None, **settings) -> Path:
    """A committed store (table reconciled) with `slides` {id: n_regions} of smooth regions."""
    from pipeline.schema.commit import reconcile

    create_store(path, store_attrs(codec, **settings))
    for seed, (slide_id, n) in enumerate((slides or {}).items()):
        write_example_slide(path, slide_id, smooth_regions(n, seed=seed))
    reconcile(path)
    return path
