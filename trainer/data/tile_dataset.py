"""`TileStoreDataset`: one slide of a tile store per sample, read lazily.

All filtering (split, label presence, region count, slide subset) happens in
the constructor, so the dataset's length is final and no DDP rank ever has to
skip a sample inside a step.

The dataset holds only the store's location and the filtered slide table; the
reader (`pipeline.schema.reader.open_store`) is opened on first access in each
process and remembered with that process's id, so DataLoader workers open the
store themselves and nothing opened in one process is used in another.

Zero-copy path: for codec `none` on a local store the reader returns the slide's
single chunk file as an `np.memmap`. The dataset re-maps those same bytes
copy-on-write (`mode="c"`: an `mmap(MAP_PRIVATE)`, no read until touched) and
wraps them with `torch.from_numpy`, so the sample's `regions` tensor *is* the
page cache until someone reads it; an in-place write lands in private pages
instead of faulting on a read-only mapping. With DataLoader workers the tensor
is copied once, into shared memory, to cross to the main process; with
`num_workers=0` the first copy is the model's own uint8 → float conversion.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from torch.utils.data import Dataset

from pipeline.schema.errors import TileStoreError
from pipeline.schema.format import StoreAttrs
from pipeline.schema.reader import open_store
from trainer.data.labels import build_label_map, encode_label, normalize_label
from trainer.data.labels import num_classes as count_classes
from trainer.data.splits import assign_splits

Sample = dict[str, Any]
RegionSelector = Callable[[np.ndarray], np.ndarray]


class TileStoreDataset(Dataset[Sample]):
    """Slides of a tile store that pass the filters, one slide per sample.

    store: local path or fsspec URL (http://, s3://) of a tile store; opened read-only.
    split: keep slides of this split ("train", "val", ...); None keeps all. The split
        comes from `split_assignment` when given, else the slide table's `split`
        column; a store without any split gets a grouped random split
        (`assign_splits(table, val_fraction, split_seed)`, by `case_id`).
    require_label: drop slides without a label.
    min_regions, max_regions: keep slides with min ≤ n_regions ≤ max (thesis: 4..999).
    slide_ids: keep only these slides (each must be in the store).
    label_map: {label: class id}; None builds it from every labelled slide in the
        store (see `trainer.data.labels`). A kept slide whose label is not in a
        given map is an error.
    split_assignment: {slide_id: split} overriding the table (e.g. from `kfold`).

    available_splits: the split names the store's slides have (after `split_assignment`).

    Sample: regions (n, R, R, 3) torch.uint8; coords (n, 2) torch.int64 (row, col)
    on the region grid; label torch.long scalar (-1: none); slide_id str; index int.
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        *,
        split: str | None = None,
        require_label: bool = False,
        min_regions: int = 4,
        max_regions: int = 999,
        slide_ids: Iterable[str] | None = None,
        label_map: Mapping[str, int] | None = None,
        split_assignment: Mapping[str, str] | pd.Series | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        if min_regions < 0 or max_regions < min_regions:
            raise ValueError(f"need 0 <= min_regions <= max_regions, got {min_regions}..{max_regions}")
        self.url = _normalize_url(store)
        opened = open_store(self.url)
        self.store_attrs: StoreAttrs = opened.attrs
        full = opened.slides.reset_index(drop=True)
        for column in ("slide_id", "n_regions"):
            if column not in full.columns:
                raise TileStoreError(f"slide table of {self.url} has no {column!r} column")

        self.label_map: dict[str, int] = (
            build_label_map(full["label"]) if label_map is None and "label" in full.columns
            else {str(k): int(v) for k, v in (label_map or {}).items()}
        )
        self.split = split
        table, self.filter_report = self._filter(
            full,
            split=split,
            require_label=require_label,
            min_regions=min_regions,
            max_regions=max_regions,
            slide_ids=slide_ids,
            split_assignment=split_assignment,
            val_fraction=val_fraction,
            split_seed=split_seed,
        )
        labels = table["label"] if "label" in table.columns else pd.Series([None] * len(table))
        self.labels = np.array(
            [encode_label(v, self.label_map, slide_id=s) for v, s in zip(labels, table["slide_id"])],
            dtype=np.int64,
        )
        self.slide_ids: list[str] = table["slide_id"].astype(str).tolist()
        self.n_regions = table["n_regions"].to_numpy(dtype=np.int64)
        self.table = table
        self._store: Any = None
        self._store_pid: int | None = None

    def _filter(
        self,
        full: pd.DataFrame,
        *,
        split: str | None,
        require_label: bool,
        min_regions: int,
        max_regions: int,
        slide_ids: Iterable[str] | None,
        split_assignment: Mapping[str, str] | pd.Series | None,
        val_fraction: float,
        split_seed: int,
    ) -> tuple[pd.DataFrame, dict[str, int]]:
        """The kept rows (table order) and how many slides each filter dropped."""
        report = {"slides_in_store": len(full)}
        split_names = self._split_column(full, split_assignment, val_fraction, split_seed)
        self.available_splits: list[str] = sorted({str(v) for v in split_names if v is not None and v == v})
        keep = pd.Series(True, index=full.index)
        if slide_ids is not None:
            wanted = [str(s) for s in slide_ids]
            missing = sorted(set(wanted) - set(full["slide_id"].astype(str)))
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise ValueError(f"{len(missing)} requested slide(s) are not in {self.url}: {shown}")
            subset = full["slide_id"].astype(str).isin(set(wanted))
            report["dropped_not_in_subset"] = int((keep & ~subset).sum())
            keep &= subset
        if split is not None:
            in_split = split_names == split
            report["dropped_other_split"] = int((keep & ~in_split).sum())
            keep &= in_split
        if require_label:
            labelled = (
                full["label"].map(normalize_label).notna() if "label" in full.columns
                else pd.Series(False, index=full.index)
            )
            report["dropped_no_label"] = int((keep & ~labelled).sum())
            keep &= labelled
        n = full["n_regions"].astype(np.int64)
        report["dropped_too_few_regions"] = int((keep & (n < min_regions)).sum())
        report["dropped_too_many_regions"] = int((keep & (n > max_regions)).sum())
        keep &= (n >= min_regions) & (n <= max_regions)
        report["kept"] = int(keep.sum())
        return full[keep].reset_index(drop=True), report

    def _split_column(
        self,
        full: pd.DataFrame,
        split_assignment: Mapping[str, str] | pd.Series | None,
        val_fraction: float,
        split_seed: int,
    ) -> pd.Series:
        """Split name per row of the full table (None where a slide has none)."""
        if split_assignment is not None:
            mapping = dict(split_assignment.items())
            return full["slide_id"].astype(str).map(lambda s: mapping.get(s))
        if "split" in full.columns and full["split"].map(normalize_label).notna().any():
            return full["split"].map(normalize_label)
        return assign_splits(full, val_fraction=val_fraction, seed=split_seed)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index: int) -> Sample:
        return self.read(index)

    def read(self, index: int, *, select: RegionSelector | None = None) -> Sample:
        """Sample `index`; `select(coords) -> indices` (e.g. the region cap) picks regions from
        the coords before any pixels are read, so only the kept regions are decoded.

        select: called with the slide's (n, 2) int64 coords; returns ascending int indices.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slides")
        index = int(index) % len(self)
        slide_id = self.slide_ids[index]
        arrays = self.store.read_slide(slide_id)
        n = int(self.n_regions[index])
        if arrays.regions.shape[0] != n or arrays.coords.shape[0] != n:
            raise TileStoreError(
                f"slide {slide_id!r} in {self.url}: the table says {n} regions but the arrays hold "
                f"{arrays.regions.shape[0]} regions and {arrays.coords.shape[0]} coords"
            )
        coords = np.asarray(arrays.coords, dtype=np.int64)
        if select is None:
            regions = regions_tensor(arrays.regions)
        else:
            keep = np.asarray(select(coords), dtype=np.int64)
            coords = coords[keep]
            regions = regions_subset(arrays.regions, keep)
        return {
            "regions": regions,
            "coords": torch.from_numpy(np.ascontiguousarray(coords)),
            "label": torch.tensor(int(self.labels[index]), dtype=torch.long),
            "slide_id": slide_id,
            "index": index,
        }

    @property
    def store(self) -> Any:
        """The reader (`TileStore`) of this process, opened on first use."""
        pid = os.getpid()
        if self._store is None or self._store_pid != pid:
            self._store = open_store(self.url)
            self._store_pid = pid
        return self._store

    @property
    def region_size(self) -> int:
        return int(self.store_attrs.region_size)

    @property
    def num_classes(self) -> int:
        """Classes in the label map (max id + 1)."""
        return count_classes(self.label_map)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        state["_store_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"TileStoreDataset({self.url!r}, split={self.split!r}, slides={len(self)})"


def regions_tensor(regions: Any) -> torch.Tensor:
    """`regions` as a uint8 tensor `(n, R, R, 3)`.

    An `np.memmap` (codec `none`, local store) is wrapped without copying (copy-on-write
    re-map of the same bytes); a lazy zarr array is read and decoded into a new array.
    """
    if isinstance(regions, np.memmap):
        return torch.from_numpy(_writable_view(regions))
    # zarr decodes a shard's inner chunks in batches of `codec_pipeline.batch_size` (default 1);
    # one batch per slide saves a round of its async machinery per region.
    with zarr.config.set({"codec_pipeline.batch_size": max(int(regions.shape[0]), 1)}):
        array = np.asarray(regions[...])
    if array.dtype != np.uint8:
        raise TileStoreError(f"regions must be uint8, the store holds {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def regions_subset(regions: Any, keep: np.ndarray) -> torch.Tensor:
    """Regions `keep` (ascending indices) of a memmap or lazy zarr array as a new uint8 tensor
    `(len(keep), R, R, 3)`; only those regions' bytes are read (pages of a memmap, chunks of zarr)."""
    if isinstance(regions, np.ndarray):
        array = regions[keep]
    else:
        with zarr.config.set({"codec_pipeline.batch_size": max(len(keep), 1)}):
            array = np.asarray(regions.get_orthogonal_selection((keep,)))
    if array.dtype != np.uint8:
        raise TileStoreError(f"regions must be uint8, the store holds {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _writable_view(mapped: np.memmap) -> np.ndarray:
    """The memmap's bytes as a writable array without reading them (mode "c": private pages)."""
    if getattr(mapped, "mode", None) == "c":
        return mapped
    filename = getattr(mapped, "filename", None)
    if filename is None or mapped.size == 0:
        return np.array(mapped)
    return np.memmap(filename, dtype=mapped.dtype, mode="c", offset=mapped.offset, shape=mapped.shape)


def _normalize_url(store: str | os.PathLike[str]) -> str:
    """URLs stay as they are; local paths become absolute (workers may chdir)."""
    text = os.fspath(store)
    return text if "://" in text else os.path.abspath(text)


def collate_slide(batch: list[Sample]) -> Sample:
    """Collate for batch_size=1: the single sample itself (slides differ in length)."""
    if len(batch) != 1:
        raise ValueError(f"one sample is one slide: use batch_size=1 (got a batch of {len(batch)})")
    return batch[0]
