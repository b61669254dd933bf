"""Tile store format version 1: names, attribute keys and the records readers trust.

This module (with the rest of `pipeline.schema`) is the only code the pipeline and
the trainer share. See DESIGN.md §5 and docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_NAME = "pixel-mamba-tile-store"
FORMAT_VERSION = "1.0"
FORMAT_MAJOR = 1

ROOT_ATTR_KEY = "tile_store"
SLIDE_TABLE = "slides.json"
SLIDES_GROUP = "slides"
TEMP_PREFIX = ".tmp-"

REGIONS = "regions"
COORDS = "coords"
ORIGIN = "origin"
FOREGROUND = "foreground"
ARRAY_NAMES = (REGIONS, COORDS, ORIGIN, FOREGROUND)

CODECS = ("none", "zstd", "jpeg")

# Magnification is a resolution (DESIGN.md §3): objective power → µm/px.
MAGNIFICATION_TO_MPP: dict[float, float] = {2.5: 4.0, 5.0: 2.0, 10.0: 1.0, 20.0: 0.5}


def mpp_for_magnification(magnification: float) -> float:
    """Target resolution in µm/px for a magnification (2.5, 5, 10 or 20)."""
    try:
        return MAGNIFICATION_TO_MPP[float(magnification)]
    except KeyError:
        known = ", ".join(f"{m:g}" for m in MAGNIFICATION_TO_MPP)
        raise ValueError(f"unsupported magnification {magnification!r}; choose one of {known}") from None


@dataclass(frozen=True, kw_only=True)
class StoreAttrs:
    """Root attributes of a tile store (under `ROOT_ATTR_KEY`).

    mpp: target resolution in µm/px; region_size: R in pixels at that resolution.
    codec: {"name": "none"|"zstd"|"jpeg", "zarr_codec": registry id or None, **settings}.
    """

    magnification: float
    mpp: float
    region_size: int
    min_foreground: float
    codec: dict[str, Any]
    segmentation: dict[str, Any]
    pipeline_version: str
    # Inexact decoding options (pixels differ from exact decoding, so they are store settings).
    decode: dict[str, Any] = field(default_factory=lambda: {"dct_scaled": False})
    created: str = ""
    format: str = FORMAT_NAME
    version: str = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StoreAttrs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def same_settings(self, other: "StoreAttrs") -> bool:
        """True when two stores were built with the same tiling settings (time/version aside)."""
        keys = ("magnification", "mpp", "region_size", "min_foreground", "codec", "segmentation", "decode", "format")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass(frozen=True, kw_only=True)
class SlideRecord:
    """One row of the slide table: a complete, committed slide."""

    slide_id: str
    n_regions: int
    label: str | None
    split: str | None
    case_id: str | None
    source_path: str
    fingerprint: str
    checksum: str
    mpp_source: str
    grid_shape: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)
    reader: str = ""  # the backend that read it, with a fallback's reason (not a store setting)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["grid_shape"] = list(self.grid_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SlideRecord":
        data = dict(data)
        data["grid_shape"] = tuple(data["grid_shape"])
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class FailureRecord:
    """A slide that could not be tiled, with a specific reason."""

    slide_id: str
    source_path: str
    reason: str
    error_type: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FailureRecord":
        return cls(**data)
