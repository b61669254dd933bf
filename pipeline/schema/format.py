"""Tile store format version 1: names, attribute keys and the records readers trust.

This module (with the rest of `pipeline.schema`) is the only code the pipeline and
the trainer share. See DESIGN.md §5 and docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_NAME = "pixel-mamba-tile-store"
FORMAT_VERSION = "1.1"  # 1.1: per-slide tissue.geojson, build_status.csv, skip-key fields; reads 1.0
FORMAT_MAJOR = 1

ROOT_ATTR_KEY = "tile_store"
SLIDE_TABLE = "slides.json"
SLIDES_GROUP = "slides"
TEMP_PREFIX = ".tmp-"
TISSUE_GEOJSON = "tissue.geojson"  # in each slide group: its tissue polygons, a file QuPath opens
STATUS_CSV = "build_status.csv"  # at the root: one row per manifest slide of the last build
# Names a slide id may not take: the group folder `slides/` holds its own zarr.json, temporary
# groups start with TEMP_PREFIX, and hidden names are the writer's (locks, leftovers). Compared
# case-insensitively, since a store may sit on a case-insensitive file system.
RESERVED_SLIDE_IDS = frozenset({"zarr.json", ".", ".."})
SLIDE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")

REGIONS = "regions"
COORDS = "coords"
ORIGIN = "origin"
FOREGROUND = "foreground"
ARRAY_NAMES = (REGIONS, COORDS, ORIGIN, FOREGROUND)

CODECS = ("none", "zstd", "jpeg")

# Magnification is a resolution (DESIGN.md §3): objective power → µm/px.
MAGNIFICATION_TO_MPP: dict[float, float] = {2.5: 4.0, 5.0: 2.0, 10.0: 1.0, 20.0: 0.5, 40.0: 0.25}
MPP_AT_1X = 10.0  # µm/px at magnification 1: mpp = 10 / magnification


def mpp_for_magnification(magnification: float) -> float:
    """Target resolution in µm/px for a named magnification (2.5, 5, 10, 20 or 40)."""
    try:
        return MAGNIFICATION_TO_MPP[float(magnification)]
    except KeyError:
        known = ", ".join(f"{m:g}" for m in MAGNIFICATION_TO_MPP)
        raise ValueError(
            f"unsupported magnification {magnification!r}; choose one of {known}, or give any resolution with --mpp"
        ) from None


def magnification_for_mpp(mpp: float) -> float:
    """The magnification a target resolution corresponds to (10 / mpp; 0.5 µm/px → 20)."""
    if not mpp > 0:
        raise ValueError(f"target mpp must be a positive number of µm/px, got {mpp!r}")
    return MPP_AT_1X / float(mpp)


def slide_id_problem(slide_id: str) -> str | None:
    """Why `slide_id` cannot be a key of the store, or None when it can."""
    if not SLIDE_ID_PATTERN.fullmatch(slide_id):
        return f"slide_id {slide_id!r} has characters outside [A-Za-z0-9._-]"
    if slide_id.lower() in RESERVED_SLIDE_IDS or slide_id.startswith("."):
        return (
            f"slide_id {slide_id!r} is a name the store reserves ('zarr.json' is the slides group's "
            f"metadata, '.'/'..' are path parts, names starting with '.' such as '{TEMP_PREFIX}…' are "
            "the writer's own); rename the slide"
        )
    return None


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

    SETTING_KEYS = ("magnification", "mpp", "region_size", "min_foreground", "codec", "segmentation", "decode", "format")

    def same_settings(self, other: "StoreAttrs") -> bool:
        """True when two stores were built with the same tiling settings (time/version aside)."""
        return not self.settings_diff(other)

    def settings_diff(self, other: "StoreAttrs") -> list[str]:
        """One line per tiling setting that differs, `name: mine → other's`; nested
        settings (codec, segmentation) are compared key by key."""
        lines = []
        for key in self.SETTING_KEYS:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine == theirs:
                continue
            if isinstance(mine, dict) and isinstance(theirs, dict):
                for sub in sorted(set(mine) | set(theirs)):
                    if mine.get(sub) != theirs.get(sub):
                        lines.append(f"{key}.{sub}: {mine.get(sub)!r} → {theirs.get(sub)!r}")
            else:
                lines.append(f"{key}: {mine!r} → {theirs!r}")
        return lines


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
    # Inputs besides the source file that decide the slide's pixels (part of the skip key):
    manifest_mpp: float | None = None  # the manifest's mpp override (µm/px), None when absent
    tissue_geojson_sha256: str | None = None  # sha256 of the manifest's tissue_geojson file
    upsampled: bool = False  # target finer than level 0, allowed by --allow-upsampling
    reader: str = ""  # the backend that read it, with a fallback's reason (not a store setting)

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy dominates writing a 10k-row table.
        data = {f.name: getattr(self, f.name) for f in _RECORD_FIELDS}
        data["grid_shape"] = list(self.grid_shape)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SlideRecord":
        """A record from its JSON; keys a newer writer added are ignored (minor versions)."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        data["grid_shape"] = tuple(data["grid_shape"])
        return cls(**data)


_RECORD_FIELDS = dataclasses.fields(SlideRecord)


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
