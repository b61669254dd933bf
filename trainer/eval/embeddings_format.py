"""The on-disk format `pm-embed` writes and `pm-eval` reads (docs/evaluation.md).

    EMB/
      embeddings.json                 format, version, settings (checkpoint, store, split, Region Fusion, ...),
                                      encoders [{name, source, model_name, objective}], label_map, ordinal, embed_dim, token_grid, complete
      slides.csv                      one row per embedded slide, store order: slide_id, label, label_id (-1: none),
                                      split, case_id, n_regions (in the store), n_embedded (regions the encoder saw)
      embeddings.zarr/<encoder>/cls      (N, C) float32  mean-pooled CLS embedding, row i = slides.csv row i
      embeddings.zarr/<encoder>/spatial  (N, C) float32  mean-pooled spatial-token embedding
      <encoder>/slide_metrics.csv     per slide: token_rankme, token_cosine (spatial tokens of the slide),
                                      region_rankme, region_cosine (region CLS tokens), n_survivors (after Region Fusion)
      <encoder>/slides/<slide_id>.npz per slide (the unit of work; written aside and renamed into place):
                                      cls (C,), spatial (C,), the metrics above, and with --per-region
                                      region_cls (n, C), region_tokens (n, h, w, C) float32, region_index (n,)
                                      (index into the store's regions), coords (n, 2) (row, col) grid,
                                      origin (n, 2) level-0 (x, y) px
      h5/<encoder>/<slide_id>.h5      with --format h5: features (n, C) per-region CLS, coords (n, 2) level-0 (x, y)
                                      origins, as CLAM and TRIDENT write them

<encoder> is "checkpoint" (the checkpoint's encoder) and "baseline" (random init of the
same variant, fixed seed) unless the baseline was skipped. Slide embeddings use Region
Fusion as in training (eval split mode) unless `region_fusion` is false; per-region
outputs and the token/region metrics come from a pass with Region Fusion off, so they
line up one-to-one with the regions' coords.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORMAT_NAME = "pixel-mamba-embeddings"
FORMAT_VERSION = 1
MANIFEST = "embeddings.json"
SLIDE_TABLE = "slides.csv"
ARRAYS = "embeddings.zarr"
SLIDE_METRICS = "slide_metrics.csv"
CHECKPOINT_ENCODER = "checkpoint"
BASELINE_ENCODER = "baseline"
SLIDE_LEVEL_FEATURES = ("cls", "spatial")
METRIC_KEYS = ("token_rankme", "token_cosine", "region_rankme", "region_cosine", "n_survivors")
REGION_KEYS = ("region_cls", "region_tokens", "region_index", "coords", "origin")
TABLE_COLUMNS = ("slide_id", "label", "label_id", "split", "case_id", "n_regions", "n_embedded")


class EmbeddingsError(Exception):
    """An embeddings folder is missing, incomplete, or was written with other settings."""


def part_path(root: Path, encoder: str, slide_id: str) -> Path:
    return Path(root) / encoder / "slides" / f"{slide_id}.npz"


def h5_path(root: Path, encoder: str, slide_id: str) -> Path:
    return Path(root) / "h5" / encoder / f"{slide_id}.h5"


def _aside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def write_part(root: Path, encoder: str, slide_id: str, arrays: Mapping[str, np.ndarray]) -> Path:
    """One slide's arrays as an .npz, written aside and renamed into place (never half-written)."""
    target = part_path(root, encoder, slide_id)
    tmp = _aside(target)
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_h5(root: Path, encoder: str, slide_id: str, *, features: np.ndarray, coords: np.ndarray,
             attrs: Mapping[str, Any]) -> Path:
    """CLAM/TRIDENT-style per-slide HDF5: `features` (n, C) float32, `coords` (n, 2) int64 level-0 (x, y)."""
    import h5py

    target = h5_path(root, encoder, slide_id)
    tmp = _aside(target)
    try:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            dataset = handle.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for key, value in attrs.items():
                dataset.attrs[key] = value
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = _aside(Path(path))
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: Path, table: pd.DataFrame) -> None:
    tmp = _aside(Path(path))
    try:
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_slide_arrays(root: Path, encoder: str, arrays: Mapping[str, np.ndarray]) -> None:
    """The consolidated (N, C) arrays of one encoder into `embeddings.zarr/<encoder>/`."""
    import zarr

    group = zarr.open_group(str(Path(root) / ARRAYS), mode="a")
    sub = group.require_group(encoder)
    for name, values in arrays.items():
        values = np.asarray(values, dtype=np.float32)
        array = sub.create_array(name, shape=values.shape, dtype=values.dtype,
                                 chunks=(max(1, min(len(values), 4096)), values.shape[1]), overwrite=True)
        if values.size:
            array[...] = values


@dataclass(frozen=True)
class Embeddings:
    """A complete embeddings folder, read back.

    table: slides.csv (N rows); manifest: embeddings.json; encoders: names in the folder.
    """

    root: Path
    manifest: dict[str, Any]
    table: pd.DataFrame

    @property
    def encoders(self) -> list[str]:
        return [entry["name"] for entry in self.manifest["encoders"]]

    @property
    def label_map(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in (self.manifest.get("label_map") or {}).items()}

    @property
    def num_classes(self) -> int:
        return max(self.label_map.values()) + 1 if self.label_map else 0

    @property
    def ordinal(self) -> bool:
        return bool(self.manifest.get("ordinal"))

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class ids, -1 for unlabelled slides."""
        return self.table["label_id"].to_numpy(dtype=np.int64)

    @property
    def groups(self) -> np.ndarray | None:
        """(N,) case ids (slide id where a slide has none); None when no slide has a case id."""
        case = self.table["case_id"]
        if case.isna().all():
            return None
        return case.fillna(self.table["slide_id"]).astype(str).to_numpy()

    def slide_features(self, encoder: str, feature: str = "cls") -> np.ndarray:
        """(N, C) float32 slide embeddings of `encoder`; feature "cls" or "spatial"."""
        import zarr

        if encoder not in self.encoders:
            raise EmbeddingsError(f"{self.root} has no encoder {encoder!r}; it holds {self.encoders}")
        if feature not in SLIDE_LEVEL_FEATURES:
            raise ValueError(f"feature must be one of {SLIDE_LEVEL_FEATURES}, got {feature!r}")
        return np.asarray(zarr.open_array(str(self.root / ARRAYS / encoder / feature), mode="r")[...])

    def slide_metrics(self, encoder: str) -> pd.DataFrame:
        """Per-slide token/region metrics of `encoder` (slides.csv order)."""
        return pd.read_csv(self.root / encoder / SLIDE_METRICS, dtype={"slide_id": str})

    def slide_part(self, encoder: str, slide_id: str) -> dict[str, np.ndarray]:
        """Everything stored for one slide (per-region arrays only with --per-region)."""
        path = part_path(self.root, encoder, slide_id)
        if not path.is_file():
            raise EmbeddingsError(f"{self.root} holds no slide {slide_id!r} for encoder {encoder!r}")
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    @property
    def has_regions(self) -> bool:
        return bool(self.manifest.get("settings", {}).get("per_region"))


def open_embeddings(root: str | os.PathLike[str]) -> Embeddings:
    """Read an embeddings folder; refuses one that is missing or not complete."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise EmbeddingsError(f"{str(root)!r} is not an embeddings folder (no {MANIFEST}); write one with pm-embed")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT_NAME or int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise EmbeddingsError(f"{manifest_path} is not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    if not manifest.get("complete"):
        raise EmbeddingsError(
            f"{str(root)!r} is incomplete (pm-embed was interrupted); run pm-embed again to finish it"
        )
    table = pd.read_csv(root / SLIDE_TABLE, dtype={"slide_id": str, "label": str, "split": str, "case_id": str},
                        keep_default_na=False, na_values=[""])
    return Embeddings(root=root, manifest=manifest, table=table)
