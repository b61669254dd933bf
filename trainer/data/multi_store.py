"""Several tile stores as one training set (e.g. PANDA and TCGA cut at one MPP and region size).

`StoreUnion` concatenates `TileStoreDataset`s. The stores must agree on MPP and
region size (a model sees one resolution); anything else is refused naming
both. Indices run through the stores in the order given; `slide_id`s stay as
the stores hold them and each sample gains "store" (its store's URL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from trainer.data.tile_dataset import TileStoreDataset


class StoreMismatch(ValueError):
    """Two stores differ in MPP or region size."""


def check_same_resolution(datasets: Sequence[TileStoreDataset]) -> None:
    """Refuse stores whose region size or MPP differ from the first one's."""
    first = datasets[0]
    for other in datasets[1:]:
        a, b = first.store_attrs, other.store_attrs
        same_mpp = abs(float(a.mpp) - float(b.mpp)) <= 1e-6 * max(1.0, abs(float(a.mpp)))
        if int(a.region_size) != int(b.region_size) or not same_mpp:
            raise StoreMismatch(
                f"stores must share one MPP and region size: {first.url} has {a.region_size} px regions at "
                f"{float(a.mpp):g} µm/px, {other.url} has {b.region_size} px at {float(b.mpp):g} µm/px"
            )


class StoreUnion(Dataset):
    """The slides of several stores, in order; the `TileStoreDataset` interface the engine uses."""

    def __init__(self, datasets: Sequence[TileStoreDataset]) -> None:
        if not datasets:
            raise ValueError("StoreUnion needs at least one store")
        check_same_resolution(datasets)
        maps = {tuple(sorted(d.label_map.items())) for d in datasets}
        if len(maps) > 1:
            raise ValueError("the stores' datasets were built with different label maps; pass one label_map to all")
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])
        self.label_map = dict(datasets[0].label_map)
        self.labels = np.concatenate([d.labels for d in datasets]) if datasets else np.zeros(0, np.int64)
        self.n_regions = np.concatenate([d.n_regions for d in datasets])
        self.slide_ids = [s for d in datasets for s in d.slide_ids]
        self.store_attrs = datasets[0].store_attrs
        self.url = ", ".join(d.url for d in datasets)
        self.filter_report: dict[str, int] = {}
        for d in datasets:
            for key, value in getattr(d, "filter_report", {}).items():
                self.filter_report[key] = self.filter_report.get(key, 0) + int(value)
        self.available_splits = sorted({s for d in datasets for s in getattr(d, "available_splits", [])})

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slides")
        which = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return which, index - int(self.offsets[which])

    def read(self, index: int, *, select: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
        which, local = self._locate(int(index))
        sample = self.datasets[which].read(local, select=select)
        sample["index"] = int(index)
        sample["store"] = self.datasets[which].url
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.read(index)

    @property
    def region_size(self) -> int:
        return int(self.store_attrs.region_size)
