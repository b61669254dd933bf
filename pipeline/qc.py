"""QC pictures: per slide, a thumbnail with the tissue contour and the kept regions drawn on it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.schema.reader import TileStore, open_store
from pipeline.tissue import geojson_to_tissue

TISSUE_COLOUR = (0, 160, 0)
REGION_COLOUR = (30, 60, 230)
BAND_PIXELS = 32 << 20  # level pixels per thumbnail read (~128 MiB of RGBA)


@dataclass(frozen=True, kw_only=True)
class QcSettings:
    """max_side: longest side of a picture in px; line_width: outline width in px."""

    max_side: int = 1000
    line_width: int = 2


def write_qc(store_url: str | os.PathLike, out_dir: str | os.PathLike, settings: QcSettings = QcSettings()) -> list[Path]:
    """Write `<out_dir>/<slide_id>.png` for every complete slide of the store; return the paths."""
    store = open_store(store_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for slide_id in store.slide_ids:
        path = out / f"{slide_id}.png"
        qc_picture(store, slide_id, settings).save(path)
        paths.append(path)
    return paths


def qc_picture(store: TileStore, slide_id: str, settings: QcSettings = QcSettings()) -> Image.Image:
    """RGB picture, longest side ≤ `max_side`: the source slide's thumbnail (white with a
    note when the source cannot be opened), tissue contour in green, regions in blue."""
    slide = store.read_slide(slide_id)
    attrs = slide.attrs
    step = float(attrs.get("step") or store.attrs.region_size * float(attrs["target_mpp"]) / float(attrs["mpp0"]))
    tissue = geojson_to_tissue(attrs["tissue_geojson"]) if attrs.get("tissue_geojson") else None
    picture, scale, note = _thumbnail(str(attrs.get("source_path", "")), slide.origin, step, tissue, settings.max_side)
    draw = ImageDraw.Draw(picture)
    if tissue is not None:
        for polygon in tissue.geoms:
            for ring in (polygon.exterior, *polygon.interiors):
                points = [(x * scale, y * scale) for x, y in ring.coords]
                if len(points) > 1:
                    draw.line(points, fill=TISSUE_COLOUR, width=settings.line_width)
    for x, y in np.asarray(slide.origin, dtype=np.float64):
        box = (x * scale, y * scale, (x + step) * scale, (y + step) * scale)
        draw.rectangle(box, outline=REGION_COLOUR, width=max(1, settings.line_width // 2))
    label = f"{slide_id}: {len(slide.origin)} regions" + (f" ({note})" if note else "")
    draw.text((4, 4), label, fill=(0, 0, 0))
    return picture


def _thumbnail(source: str, origin: np.ndarray, step: float, tissue, max_side: int) -> tuple[Image.Image, float, str]:
    """(picture, level-0 → picture scale, note)."""
    from pipeline.readers import open_reader
    from pipeline.slide import SlideError

    try:
        slide = open_reader(source)
    except (SlideError, OSError) as error:
        extent = np.asarray(origin, dtype=np.float64).max(axis=0) + step if len(origin) else np.array([step, step])
        if tissue is not None and not tissue.is_empty:
            extent = np.maximum(extent, np.asarray(tissue.bounds[2:]))
        scale = max_side / float(max(extent))
        size = tuple(max(1, round(float(v) * scale)) for v in extent)
        return Image.new("RGB", size, "white"), scale, f"source not readable: {error}"
    try:
        width0, height0 = slide.level_dimensions[0]
        scale = min(1.0, max_side / max(width0, height0))
        size = (max(1, round(width0 * scale)), max(1, round(height0 * scale)))
        wanted = 1.0 / scale
        level = max((i for i, d in enumerate(slide.level_downsamples) if d <= wanted * 1.01),
                    key=lambda i: slide.level_downsamples[i], default=0)
        picture = _read_level_scaled(slide, level, size)
    finally:
        slide.close()
    return picture, scale, ""


def _read_level_scaled(slide, level: int, size: tuple[int, int]) -> Image.Image:
    """Level `level` resized to `size` (w, h), read in bands of ≤ BAND_PIXELS level pixels so
    that a slide without a pyramid never loads its whole level 0 at once."""
    width, height = slide.level_dimensions[level]
    band = max(1, BAND_PIXELS // max(1, width))
    picture = Image.new("RGB", size, "white")
    for top in range(0, height, band):
        rows = min(band, height - top)
        y0, y1 = round(top * size[1] / height), round((top + rows) * size[1] / height)
        if y1 <= y0:
            continue
        rgb = slide.read_level(level, 0, top, width, rows)
        picture.paste(Image.fromarray(rgb).resize((size[0], y1 - y0), Image.Resampling.BOX), (0, y0))
    return picture
