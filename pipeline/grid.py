"""The region grid of DESIGN.md §3, foreground fractions, and the pyramid level to read.

Grid step in level-0 px: s = R · target_mpp / mpp0 (a float). Region (row, col) has
level-0 origin (x, y) = (round(col·s), round(row·s)); its footprint is the float square
[x, x + s) × [y, y + s). A region exists only when its footprint lies inside the slide
(x + s ≤ width0 and y + s ≤ height0); the grid is anchored at level-0 (0, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

# Foreground fractions are compared with this slack, so that an exact half is kept at 0.5.
FOREGROUND_TOLERANCE = 1e-9
# A pyramid level within this relative distance of the needed downsample counts as exact.
LEVEL_TOLERANCE = 0.01


@dataclass(frozen=True, kw_only=True)
class RegionGrid:
    """The kept regions of one slide, in row-major grid order.

    coords: (n, 2) int32 (row, col); origin: (n, 2) int64 level-0 (x, y) of the top-left corner;
    foreground: (n,) float32 tissue fraction of each footprint; step: s in level-0 px;
    grid_shape: (rows, cols) of the full grid of whole regions.
    """

    coords: np.ndarray
    origin: np.ndarray
    foreground: np.ndarray
    step: float
    grid_shape: tuple[int, int]

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def grid_step(mpp0: float, target_mpp: float, region_size: int) -> float:
    """s = R · target_mpp / mpp0: a region's side in level-0 px."""
    if mpp0 <= 0 or target_mpp <= 0 or region_size <= 0:
        raise ValueError(f"need positive mpp0, target_mpp, region_size; got {mpp0}, {target_mpp}, {region_size}")
    return region_size * target_mpp / mpp0


def _whole_positions(extent: int, step: float) -> np.ndarray:
    """Origins round(i·s) of the whole regions along an axis of `extent` level-0 px: (k,) int64."""
    index = np.arange(int(math.floor(extent / step)) + 2, dtype=np.int64)
    origins = np.round(index * step).astype(np.int64)
    return origins[origins + step <= extent + 1e-9]


def region_grid(
    width0: int,
    height0: int,
    mpp0: float,
    target_mpp: float,
    region_size: int,
    tissue: BaseGeometry,
    min_foreground: float,
) -> RegionGrid:
    """The regions whose footprint is at least `min_foreground` tissue (exact polygon areas).

    width0, height0: level-0 size in px; mpp0, target_mpp: µm/px; tissue: (Multi)Polygon
    in level-0 px. Regions come back in row-major order.
    """
    if not 0.0 <= min_foreground <= 1.0:
        raise ValueError(f"min_foreground must be in [0, 1], got {min_foreground}")
    step = grid_step(mpp0, target_mpp, region_size)
    xs, ys = _whole_positions(width0, step), _whole_positions(height0, step)
    grid_shape = (len(ys), len(xs))
    empty = RegionGrid(
        coords=np.zeros((0, 2), np.int32),
        origin=np.zeros((0, 2), np.int64),
        foreground=np.zeros((0,), np.float32),
        step=step,
        grid_shape=grid_shape,
    )
    polygons = [p for p in shapely.get_parts(tissue) if not p.is_empty and p.area > 0]
    if not xs.size or not ys.size or not polygons:
        return empty
    rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x0, y0 = xs[cols].astype(np.float64), ys[rows].astype(np.float64)
    boxes = shapely.box(x0, y0, x0 + step, y0 + step)
    covered = _covered_area(boxes, polygons)
    fraction = covered / (step * step)
    keep = np.flatnonzero(fraction >= min_foreground - FOREGROUND_TOLERANCE)
    if keep.size == 0:
        return empty
    return RegionGrid(
        coords=np.stack([rows[keep], cols[keep]], axis=1).astype(np.int32),
        origin=np.stack([xs[cols[keep]], ys[rows[keep]]], axis=1).astype(np.int64),
        foreground=np.minimum(fraction[keep], 1.0).astype(np.float32),
        step=step,
        grid_shape=grid_shape,
    )


def _covered_area(boxes: np.ndarray, polygons: list) -> np.ndarray:
    """Area of each box covered by the union of disjoint `polygons`: (n,) float64.

    An STRtree finds the (box, polygon) pairs that touch; pairs where the polygon
    contains the box count the whole box, the rest are clipped to the box with GEOS's
    rectangle clipping (exact, and about twice as fast as a general intersection).
    """
    area = np.zeros(len(boxes), np.float64)
    tree = shapely.STRtree(polygons)
    box_index, polygon_index = tree.query(boxes, predicate="intersects")
    if box_index.size == 0:
        return area
    parts = np.asarray(polygons, dtype=object)[polygon_index]
    shapely.prepare(parts)
    inside = shapely.contains(parts, boxes[box_index])
    pair_area = np.where(inside, shapely.area(boxes[box_index]), 0.0)
    partial = ~inside
    corners = shapely.bounds(boxes[box_index[partial]])
    pair_area[partial] = [shapely.area(shapely.clip_by_rect(part, *box)) for part, box in zip(parts[partial], corners)]
    np.add.at(area, box_index, pair_area)
    return area


def choose_level(level_downsamples: tuple[float, ...] | list[float], needed_downsample: float) -> tuple[int, float]:
    """The coarsest pyramid level whose downsample is ≤ `needed_downsample`, and the resize factor.

    A level within 1 % of the needed downsample counts as exact: resize factor 1.0.
    Otherwise the factor is needed / level downsample (> 1: the level is finer than needed).
    """
    if needed_downsample <= 0:
        raise ValueError(f"needed downsample must be positive, got {needed_downsample}")
    candidates = [(d, i) for i, d in enumerate(level_downsamples) if d <= needed_downsample * (1 + LEVEL_TOLERANCE)]
    if not candidates:
        # Only a level finer than needed would do; there is none coarser-or-equal, so level 0 upsamples.
        return 0, needed_downsample / level_downsamples[0]
    downsample, level = max(candidates)
    if abs(downsample - needed_downsample) <= LEVEL_TOLERANCE * needed_downsample:
        return level, 1.0
    return level, needed_downsample / downsample
