"""`pm-tiles export-coords`: region coordinates in the files CLAM/TRIDENT-style MIL code reads.

h5 (one `<slide_id>.h5` per complete slide, as CLAM's `create_patches_fp.py` writes):
dataset `coords` int64 `(n, 2)`: level-0 (x, y) of each region's top-left corner, in the
store's row-major order, with attributes
- `patch_level`, `patch_size`: the pyramid level the pipeline read and the footprint side
  in that level's pixels (CLAM reads `patch_size` px at `patch_level`, then resizes);
- `patch_size_level0`, `level0_magnification`, `target_magnification` (TRIDENT's names);
- `region_size` (R, px at the target), `target_mpp`, `mpp0` (µm/px), `name`;
dataset `foreground` float32 `(n,)` and `grid` int32 `(n, 2)` (row, col) beside it.

csv: one `coords.csv`, a row per region: slide_id, x, y, row, col, foreground,
patch_level, patch_size, patch_size_level0.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.schema.format import MPP_AT_1X
from pipeline.schema.reader import TileStore, open_store

FORMATS = ("h5", "csv")


def _patch_attrs(store: TileStore, slide_id: str) -> dict[str, Any]:
    attrs = store.slide_attrs(slide_id)
    step = float(attrs["step"])  # level-0 px per region
    level_downsample = float(attrs.get("level_downsample", 1.0))
    mpp0 = float(attrs["mpp0"])
    return {
        "name": slide_id,
        "patch_level": int(attrs["level"]),
        "patch_size": int(round(step / level_downsample)),
        "patch_size_level0": int(round(step)),
        "level0_magnification": MPP_AT_1X / mpp0,
        "target_magnification": float(store.attrs.magnification),
        "region_size": int(store.attrs.region_size),
        "target_mpp": float(store.attrs.mpp),
        "mpp0": mpp0,
    }


def export_coords(url: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "h5",
                  storage_options: dict[str, Any] | None = None) -> list[Path]:
    """Write the coordinates of every complete slide of the store at `url` under `out`;
    returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown coordinate format {fmt!r}; choose one of {', '.join(FORMATS)}")
    store = open_store(url, storage_options=storage_options)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "h5":
        return [_write_h5(store, slide_id, folder) for slide_id in store.slide_ids]
    return [_write_csv(store, folder)]


def _write_h5(store: TileStore, slide_id: str, folder: Path) -> Path:
    import h5py

    arrays = store.read_slide(slide_id)
    path = folder / f"{slide_id}.h5"
    aside = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(aside, "w") as handle:
        coords = handle.create_dataset("coords", data=np.asarray(arrays.origin, dtype=np.int64))
        for key, value in _patch_attrs(store, slide_id).items():
            coords.attrs[key] = value
        handle.create_dataset("foreground", data=np.asarray(arrays.foreground, dtype=np.float32))
        handle.create_dataset("grid", data=np.asarray(arrays.coords, dtype=np.int32))
    os.replace(aside, path)
    return path


def _write_csv(store: TileStore, folder: Path) -> Path:
    path = folder / "coords.csv"
    aside = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(aside, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "x", "y", "row", "col", "foreground", "patch_level", "patch_size",
                         "patch_size_level0"])
        for slide_id in store.slide_ids:
            arrays = store.read_slide(slide_id)
            patch = _patch_attrs(store, slide_id)
            for (x, y), (row, col), fg in zip(arrays.origin.tolist(), arrays.coords.tolist(),
                                              arrays.foreground.tolist(), strict=True):
                writer.writerow([slide_id, x, y, row, col, f"{fg:.4f}", patch["patch_level"], patch["patch_size"],
                                 patch["patch_size_level0"]])
    os.replace(aside, path)
    return path
