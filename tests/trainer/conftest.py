"""Fixtures for the engine, objective and CLI tests: labelled stores made from the real slide.

`stain_store` holds two classes of slides whose class is visible in the tissue:
class "he" keeps the real slide's H&E colours, class "dab" is the same kind of
tissue recoloured (RGB channels rolled, so pink/purple becomes green/blue-ish).
Regions are 32×32 crops of the real slide (block-mean downsampled 4×, so each
crop shows ~64 µm of tissue) from random tissue locations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import reconcile
from pipeline.schema.format import StoreAttrs
from pipeline.store_writer import create_store, write_slide

TINY_REGION = 32


def _tissue_crops(slide_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The real slide downsampled 4× (H, W, 3) uint8 and the top-left corners of tissue crops."""
    import openslide

    with openslide.OpenSlide(str(slide_path)) as slide:
        image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    h, w = (image.shape[0] // 4) * 4, (image.shape[1] // 4) * 4
    small = image[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)).astype(np.uint8)
    corners = [
        (y, x)
        for y in range(0, small.shape[0] - size, size // 2)
        for x in range(0, small.shape[1] - size, size // 2)
        if small[y : y + size, x : x + size].mean() < 200
    ]
    return small, np.array(corners)


def write_stain_store(
    path: Path,
    slide_path: Path,
    *,
    per_class: dict[str, int],
    n_regions: tuple[int, int] = (4, 7),
    seed: int = 0,
    size: int = TINY_REGION,
    mpp: float = 2.0,
    labelled: bool = True,
) -> Path:
    """A store of `per_class[split]` slides per class and split ({"train": 6, "val": 4})."""
    small, corners = _tissue_crops(slide_path, size)
    rng = np.random.default_rng(seed)
    create_store(
        path,
        StoreAttrs(
            magnification=10.0 / mpp, mpp=mpp, region_size=size, min_foreground=0.5,
            codec=codec_settings("none"), segmentation={"method": "test"}, pipeline_version="test",
        ),
    )
    for split, count in per_class.items():
        for label in ("he", "dab"):
            for i in range(count):
                n = int(rng.integers(n_regions[0], n_regions[1] + 1))
                picks = corners[rng.choice(len(corners), size=n, replace=False)]
                regions = np.stack([small[y : y + size, x : x + size] for y, x in picks])
                if label == "dab":
                    regions = np.roll(regions, 1, axis=-1)
                coords = np.stack([np.arange(n) // 3, np.arange(n) % 3], axis=1).astype(np.int32)
                write_slide(
                    path, f"{split}-{label}-{i}",
                    regions=regions, n_regions=n, coords=coords, origin=coords.astype(np.int64) * 64,
                    foreground=np.ones(n, np.float32),
                    attrs={
                        "source_path": str(slide_path), "fingerprint": f"test-{split}-{label}-{i}",
                        "label": label if labelled else None, "split": split, "case_id": f"{split}-{label}-{i}",
                        "mpp_source": "test", "grid_shape": [3, 3],
                    },
                )  # fmt: skip
    reconcile(path)
    return path


@pytest.fixture(scope="session")
def stain_store(tmp_path_factory: pytest.TempPathFactory, real_slide_path: Path) -> Path:
    """Two-class store at 2 µm/px, 32-px regions: 6 train + 4 val slides per class."""
    return write_stain_store(
        tmp_path_factory.mktemp("stain") / "stain.zarr", real_slide_path, per_class={"train": 6, "val": 4}
    )


@pytest.fixture(scope="session")
def unlabelled_store(tmp_path_factory: pytest.TempPathFactory, real_slide_path: Path) -> Path:
    """Same layout without labels."""
    return write_stain_store(
        tmp_path_factory.mktemp("unlabelled") / "unlabelled.zarr", real_slide_path,
        per_class={"train": 2}, labelled=False,
    )


@pytest.fixture(scope="session")
def other_mpp_store(tmp_path_factory: pytest.TempPathFactory, real_slide_path: Path) -> Path:
    """Labelled store at 1 µm/px (10×): must be refused by a 2 µm/px checkpoint."""
    return write_stain_store(
        tmp_path_factory.mktemp("mpp1") / "mpp1.zarr", real_slide_path, per_class={"train": 2, "val": 1}, mpp=1.0
    )

