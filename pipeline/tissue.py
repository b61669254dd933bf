"""Tissue segmentation to shapely polygons in level-0 pixels, and GeoJSON in/out.

The slide is read at about `TissueSettings.mpp` µm/px (4 by default; at a stored level
up to `coarsest_mpp` when one is there, or coarser when the mask would exceed
`max_side` pixels), then: HSV
saturation → median blur → Otsu threshold with a floor → optional pen-ink removal →
morphological closing → small objects removed and small holes filled → contours →
polygons (holes kept), scaled to level-0 coordinates.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from skimage import color, filters, measure, morphology
from skimage.filters import rank

from pipeline.readers import as_reader

BAND_PIXELS = 32 << 20  # level pixels read at once while building the mask


@dataclass(frozen=True, kw_only=True)
class TissueSettings:
    """Segmentation settings (recorded in the store's root attributes).

    mpp: working resolution in µm/px; coarsest_mpp: a pyramid level between `mpp` and
    this is used as it is (no finer level decoded); max_side: cap on the mask's longer side (px).
    median_um: median-blur window (µm); saturation_floor: lowest threshold on
    saturation in 0..255 (Otsu on a nearly blank slide would split noise);
    closing_um: closing disk radius (µm); min_object_um2 / max_hole_um2: objects
    smaller than this are dropped, holes smaller than this filled (µm²);
    pen_filter: drop blue/green/black marker ink.
    """

    mpp: float = 4.0
    coarsest_mpp: float = 8.0
    max_side: int = 4096
    median_um: float = 28.0
    saturation_floor: float = 15.0
    closing_um: float = 16.0
    min_object_um2: float = 10_000.0
    max_hole_um2: float = 4_000.0
    pen_filter: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TissueMask:
    """A binary mask and its scale: pixel (i, j) covers level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d).

    mask: (h, w) bool; downsample: d, level-0 px per mask px; mpp: d · mpp0 in µm/px.
    """

    mask: np.ndarray
    downsample: float
    mpp: float


def read_overview(slide, downsample: float) -> np.ndarray:
    """The whole slide area-resized by `downsample` (level-0 px per output px): (h, w, 3) uint8.

    slide: a `pipeline.readers.SlideReader` (or an open `openslide.OpenSlide`).
    Reads the coarsest level not coarser than `downsample`, one band of rows at a time
    (memory stays near `BAND_PIXELS`), each band box-filtered to the output scale.
    """
    slide = as_reader(slide)
    width0, height0 = slide.level_dimensions[0]
    out_w, out_h = max(1, math.ceil(width0 / downsample)), max(1, math.ceil(height0 / downsample))
    level = max(
        (i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.01),
        key=lambda i: slide.level_downsamples[i],
    )
    level_ds = slide.level_downsamples[level]
    factor = downsample / level_ds  # level px per output px
    level_w = math.ceil(out_w * factor)
    rows_per_band = max(1, int(BAND_PIXELS / (level_w * factor * factor) / 1))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        ya, yb = math.floor(r0 * factor), math.ceil(r1 * factor)
        band = slide.read_level(level, 0, ya, level_w, yb - ya)
        if factor == 1:  # the level is the overview: PIL's resize would return a copy of it
            out[r0:r1] = band[:, :out_w]
            continue
        image = Image.fromarray(band)
        box = (0.0, r0 * factor - ya, out_w * factor, r1 * factor - ya)
        out[r0:r1] = np.asarray(image.resize((out_w, r1 - r0), Image.Resampling.BOX, box=box))
    return out


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0..255: (h, w, 3) uint8 → (h, w) uint8, (max − min) / max."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(r, g), b)
    spread = high - np.minimum(np.minimum(r, g), b)
    out = np.zeros(high.shape, np.uint8)
    np.floor_divide(spread.astype(np.uint16) * 255 + high // 2, high, out=out, where=high > 0, casting="unsafe")
    return out


def median_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """`size`×`size` median with edge-replicated borders: (h, w) uint8 → (h, w) uint8.

    Equal to `scipy.ndimage.median_filter(image, size, mode="nearest")`, about 2× faster:
    for a 3×3 window, a 19-step min/max median network over the 9 shifted copies (in row
    bands, memory ≤ ~BAND_PIXELS);
    for larger ones, scikit-image's histogram-sliding rank filter on the edge-padded image
    (every window whole, so the borders match).
    """
    if size <= 1:
        return image
    pad = size // 2
    padded = np.pad(image, pad, mode="edge")
    if size > 3:
        return rank.median(padded, footprint=np.ones((size, size), bool))[pad:-pad, pad:-pad]
    h, w = image.shape
    out = np.empty_like(image)
    rows = max(1, BAND_PIXELS // (9 * max(w, 1)))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        p = [padded[r0 + dy : r1 + dy, dx : dx + w].copy() for dy in range(3) for dx in range(3)]
        for i, j in _MEDIAN9_NETWORK:  # compare-exchange: p[i] ≤ p[j] afterwards
            p[i], p[j] = np.minimum(p[i], p[j]), np.maximum(p[i], p[j])
        out[r0:r1] = p[4]
    return out


# The 19 compare-exchanges after which element 4 of 9 is their median (Paeth's network).
_MEDIAN9_NETWORK = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)


def pen_ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Marker ink that is not H&E: blue/cyan and green hues with some saturation, or near-black.

    rgb: (h, w, 3) uint8 → (h, w) bool. H&E stains sit at pink-to-purple hues (≳ 0.72 or ≲ 0.1).
    """
    hsv = color.rgb2hsv(rgb)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = (sat > 0.2) & (hue > 0.2) & (hue < 0.7)
    black = val < 0.2
    return coloured | black


def tissue_mask(slide, mpp0: float, settings: TissueSettings) -> TissueMask:
    """Binary tissue mask at about `settings.mpp` µm/px (see module docstring for the steps).

    slide: a `pipeline.readers.SlideReader` (or an open `openslide.OpenSlide`).
    """
    slide = as_reader(slide)
    width0, height0 = slide.level_dimensions[0]
    downsample = max(settings.mpp / mpp0, max(width0, height0) / settings.max_side, 1.0)
    # A stored level a little coarser than asked is cheaper than decoding a finer one.
    coarser = [d for d in slide.level_downsamples if downsample < d <= settings.coarsest_mpp / mpp0 * 1.01]
    if coarser:
        downsample = max(coarser)
    rgb = read_overview(slide, downsample)
    mask_mpp = downsample * mpp0
    saturation = hsv_saturation(rgb)
    size = 2 * round((max(settings.median_um / mask_mpp, 1.0) - 1) / 2) + 1  # nearest odd window
    saturation = median_nearest(saturation, size)
    if saturation.max() - saturation.min() < 1e-3:
        threshold = settings.saturation_floor
    else:
        threshold = max(float(filters.threshold_otsu(saturation, nbins=256)), settings.saturation_floor)
    mask = saturation > threshold
    if settings.pen_filter:
        mask &= ~ndimage.binary_dilation(pen_ink_mask(rgb), iterations=2)
    radius = round(settings.closing_um / mask_mpp)
    if radius >= 1:
        # Pad so that closing does not erode tissue touching the border.
        padded = np.pad(mask, radius, mode="edge")
        mask = binary_closing_disk(padded, radius)[radius:-radius, radius:-radius]
    px_area = mask_mpp * mask_mpp
    min_object = round(settings.min_object_um2 / px_area)
    max_hole = round(settings.max_hole_um2 / px_area)
    mask = _fill_small_holes(_drop_small_components(mask, min_object), max_hole)
    return TissueMask(mask=mask, downsample=downsample, mpp=mask_mpp)


def binary_closing_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """`scipy.ndimage.binary_closing(mask, structure=skimage.morphology.disk(radius))`, the same
    pixels, ~10× faster: (h, w) bool → (h, w) bool. The dilation ORs and the erosion ANDs the
    mask shifted by each offset of the (symmetric) disk; outside the array counts as background
    (scipy's border_value 0), so the erosion clears pixels whose disk leaves the array."""
    offsets = np.argwhere(morphology.disk(radius)) - radius
    dilated = np.zeros_like(mask)
    for dy, dx in offsets:
        dilated |= _shift(mask, dy, dx)
    closed = np.ones_like(mask)
    for dy, dx in offsets:
        closed &= _shift(dilated, dy, dx)
    return closed


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = mask[y + dy, x + dx], False where that lies outside: (h, w) bool → (h, w) bool."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) < h and abs(dx) < w:
        out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = mask[
            max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
        ]
    return out


def _fill_small_holes(mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """`mask` with its holes of at most `max_pixels` pixels filled. A hole is an 8-connected
    background component that does not reach the border: the background around the tissue is
    never one, however small the slide (a blank thumbnail must stay blank)."""
    if max_pixels <= 0:
        return mask
    framed = np.pad(~mask, 1, constant_values=True)  # the frame joins all border background
    labels, _ = ndimage.label(framed, structure=np.ones((3, 3), bool))
    small = np.bincount(labels.ravel()) <= max_pixels
    small[0] = False
    small[labels[0, 0]] = False
    return mask | small[labels][1:-1, 1:-1]


def _drop_small_components(mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """`mask` without its 8-connected components of at most `max_pixels` pixels."""
    if max_pixels <= 0 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_pixels
    keep[0] = False
    return keep[labels]


def mask_to_polygons(mask: np.ndarray, downsample: float) -> MultiPolygon:
    """Polygons (holes kept) tracing a binary mask, in level-0 px: `MultiPolygon`, possibly empty.

    Contours run through pixel edges' midpoints (marching squares at 0.5); mask pixel j
    spans level-0 [j·d, (j+1)·d), so a contour coordinate c maps to (c + 0.5)·d.
    """
    if not mask.any():
        return MultiPolygon()
    padded = np.pad(mask.astype(np.uint8), 1)
    rings = []
    for contour in measure.find_contours(padded, 0.5):
        if len(contour) < 4:
            continue
        xy = (contour[:, ::-1] - 1 + 0.5) * downsample
        ring = Polygon(xy)
        if ring.area > 0:
            rings.append(ring)
    if not rings:
        return MultiPolygon()
    # Contours of a binary mask never cross, so nesting depth decides shell (even) vs hole (odd).
    rings.sort(key=lambda p: p.area, reverse=True)
    tree = shapely.STRtree(rings)
    points = [ring.representative_point() for ring in rings]
    depth = [0] * len(rings)
    parent = [-1] * len(rings)
    for i, point in enumerate(points):
        containing = [j for j in tree.query(point, predicate="within") if j != i and rings[j].area > rings[i].area]
        depth[i] = len(containing)
        if containing:
            parent[i] = min(containing, key=lambda j: rings[j].area)
    holes: dict[int, list] = {}
    for i in range(len(rings)):
        if depth[i] % 2 == 1:
            holes.setdefault(parent[i], []).append(rings[i].exterior.coords)
    shells = [Polygon(rings[i].exterior.coords, holes.get(i, [])) for i in range(len(rings)) if depth[i] % 2 == 0]
    geometry = shapely.make_valid(shapely.union_all([shapely.make_valid(s) for s in shells]))
    return _as_multipolygon(geometry)


def _as_multipolygon(geometry) -> MultiPolygon:
    polygons = [g for g in shapely.get_parts(geometry) if isinstance(g, Polygon) and not g.is_empty]
    polygons += [p for g in shapely.get_parts(geometry) if isinstance(g, MultiPolygon) for p in g.geoms]
    return MultiPolygon(polygons)


def segment_tissue(slide, mpp0: float, settings: TissueSettings) -> MultiPolygon:
    """Tissue polygons of a slide in level-0 pixel coordinates (empty when there is no tissue).

    mpp0: level-0 µm/px (from `pipeline.slide.resolve_mpp`).
    """
    found = tissue_mask(slide, mpp0, settings)
    return mask_to_polygons(found.mask, found.downsample)


def tissue_to_geojson(geometry) -> dict[str, Any]:
    """GeoJSON FeatureCollection in level-0 px, one QuPath-style 'Tissue' annotation per polygon."""
    features = [
        {
            "type": "Feature",
            "geometry": mapping(polygon),
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
        }
        for polygon in _as_multipolygon(geometry).geoms
    ]
    return {"type": "FeatureCollection", "features": features}


def geojson_to_tissue(data: Any) -> MultiPolygon:
    """Polygons from GeoJSON (FeatureCollection, Feature, a list of features as QuPath exports,
    or a bare geometry), level-0 px; non-polygon features are ignored; overlaps are unioned."""
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "type" in data:
        features = [{"type": "Feature", "geometry": data}]
    else:
        raise ValueError("not GeoJSON: expected a FeatureCollection, a Feature, a list of features or a geometry")
    geometries = []
    for feature in features:
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if geometry and geometry.get("type") in ("Polygon", "MultiPolygon"):
            geometries.append(shapely.make_valid(shape(geometry)))
    return _as_multipolygon(shapely.union_all(geometries)) if geometries else MultiPolygon()


def load_tissue_geojson(path: str | Path) -> MultiPolygon:
    """Tissue polygons (level-0 px) from a GeoJSON file, e.g. exported from QuPath."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return geojson_to_tissue(data)
    except (OSError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"cannot read tissue GeoJSON {path}: {error}") from error
