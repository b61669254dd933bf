"""Small tile stores written with the pipeline's store writer (helpers for the dataset tests)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import reconcile
from pipeline.schema.format import StoreAttrs
from pipeline.store_writer import create_store, write_slide

REGION_SIZE = 32


@dataclass(frozen=True, kw_only=True)
class SlideSpec:
    """One slide to write: id, region count, table fields."""

    slide_id: str
    n: int
    label: str | int | None = None
    split: str | None = None
    case_id: str | None = None


def slide_regions(spec: SlideSpec, size: int = REGION_SIZE) -> np.ndarray:
    """Deterministic smooth-ish content per slide, (n, size, size, 3) uint8 (JPEG-friendly)."""
    rng = np.random.default_rng(zlib.crc32(spec.slide_id.encode()))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    regions = np.empty((spec.n, size, size, 3), np.uint8)
    for i in range(spec.n):
        base = rng.uniform(60, 200, size=3)
        wave = 40 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2)))
        regions[i] = np.clip(base[None, None, :] + wave[..., None], 0, 255).astype(np.uint8)
    return regions


def slide_coords(n: int, width: int = 5) -> np.ndarray:
    """Row-major grid positions of n regions on a grid `width` columns wide: (n, 2) int32."""
    index = np.arange(n)
    return np.stack([index // width, index % width], axis=1).astype(np.int32)


def build_store(path: Path, specs: list[SlideSpec], codec: str = "none", size: int = REGION_SIZE) -> Path:
    """Write a complete store (all slides committed, table written) and return its path."""
    attrs = StoreAttrs(
        magnification=5.0, mpp=2.0, region_size=size, min_foreground=0.5,
        codec=codec_settings(codec), segmentation={"method": "test"}, pipeline_version="test",
    )
    create_store(path, attrs)
    for spec in specs:
        write_slide(
            path, spec.slide_id,
            regions=slide_regions(spec, size), n_regions=spec.n, coords=slide_coords(spec.n),
            origin=slide_coords(spec.n).astype(np.int64) * 64, foreground=np.ones(spec.n, np.float32),
            attrs={
                "source_path": f"/slides/{spec.slide_id}.tif", "fingerprint": f"fp-{spec.slide_id}",
                "label": spec.label, "split": spec.split, "case_id": spec.case_id,
                "mpp_source": "test", "grid_shape": [8, 5],
            },
        )
    reconcile(path)
    return path


SPECS = [
    SlideSpec(slide_id="s00", n=4, label="tumour", split="train", case_id="p0"),
    SlideSpec(slide_id="s01", n=7, label="normal", split="train", case_id="p0"),
    SlideSpec(slide_id="s02", n=3, label="normal", split="train", case_id="p1"),
    SlideSpec(slide_id="s03", n=12, label=None, split="train", case_id="p1"),
    SlideSpec(slide_id="s04", n=5, label="tumour", split="val", case_id="p2"),
    SlideSpec(slide_id="s05", n=9, label="stroma", split="val", case_id="p3"),
    SlideSpec(slide_id="s06", n=20, label="tumour", split="train", case_id="p4"),
    SlideSpec(slide_id="s07", n=6, label="normal", split="test", case_id="p5"),
]
