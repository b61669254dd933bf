"""Tissue segmentation on synthetic slides, GeoJSON in and out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from synthetic import write_synthetic_slide

from pipeline.slide import open_slide
from pipeline.tissue import (
    TissueSettings,
    load_tissue_geojson,
    mask_to_polygons,
    segment_tissue,
    tissue_to_geojson,
)

MPP = 1.0  # 4 level-0 px per mask px at the default 4 µm/px


def _segment(tmp_path, rects, **kwargs):
    path = tmp_path / "s.tif"
    write_synthetic_slide(path, width=1024, height=768, mpp=MPP, tissue_rects=rects, levels=(1, 4), **kwargs)
    return segment_tissue(open_slide(path), MPP, TissueSettings())


def test_rectangles_are_found_in_level0_coordinates(tmp_path):
    rects = [(100, 120, 400, 300), (600, 400, 300, 280)]
    tissue = _segment(tmp_path, rects)
    assert len(tissue.geoms) == 2
    truth = shapely.union_all([box(x, y, x + w, y + h) for x, y, w, h in rects])
    # Boundaries are exact to about one mask pixel (4 level-0 px).
    assert tissue.symmetric_difference(truth).area < 0.03 * truth.area
    assert tissue.buffer(8).contains(truth) and truth.buffer(8).contains(tissue)


def test_holes_are_kept_and_small_specks_dropped(tmp_path):
    ring = [(100, 100, 600, 100), (100, 500, 600, 100), (100, 200, 100, 300), (600, 200, 100, 300)]
    speck = [(900, 50, 40, 40)]  # 1600 µm² < min_object_um2
    tissue = _segment(tmp_path, ring + speck)
    assert len(tissue.geoms) == 1
    polygon = tissue.geoms[0]
    assert len(polygon.interiors) == 1
    assert not tissue.contains(shapely.Point(400, 350))
    assert tissue.contains(shapely.Point(150, 150))


def test_blank_slide_has_no_tissue(tmp_path):
    tissue = _segment(tmp_path, [])
    assert tissue.is_empty


def test_pen_filter_removes_green_marker(tmp_path):
    path = tmp_path / "pen.tif"
    write_synthetic_slide(path, width=1024, height=768, mpp=MPP, levels=(1, 4), tissue_rects=[(0, 0, 400, 768)])
    green = tmp_path / "green.tif"
    image = write_synthetic_slide(
        green, width=1024, height=768, mpp=MPP, levels=(1, 4), tissue_rects=[(600, 100, 300, 500)],
        colour=(40, 170, 60), textured=False,
    )
    assert image[300, 700].tolist() == [40, 170, 60]
    slide = open_slide(green)
    assert not segment_tissue(slide, MPP, TissueSettings()).is_empty
    assert segment_tissue(slide, MPP, TissueSettings(pen_filter=True)).is_empty
    kept = segment_tissue(open_slide(path), MPP, TissueSettings(pen_filter=True))
    assert kept.area > 0.9 * 400 * 768


def test_mask_to_polygons_scales_pixel_edges():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True
    polygons = mask_to_polygons(mask, 4.0)
    # Marching squares cuts the corners by half a pixel; edges sit on pixel boundaries.
    assert polygons.bounds == (12.0, 8.0, 32.0, 24.0)
    assert abs(polygons.area - (20 * 16 - 4 * 0.5 * 2 * 2)) < 1e-9


def test_geojson_round_trip_and_qupath_list(tmp_path):
    geometry = MultiPolygon([Polygon([(0, 0), (100, 0), (100, 50), (0, 50)], [[(10, 10), (20, 10), (20, 20), (10, 20)]]), box(200, 0, 300, 80)])
    data = tissue_to_geojson(geometry)
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    assert data["features"][0]["properties"]["classification"]["name"] == "Tissue"
    path = tmp_path / "t.geojson"
    path.write_text(json.dumps(data))
    assert load_tissue_geojson(path).equals(geometry)
    path.write_text(json.dumps(data["features"]))  # QuPath's "export as array"
    assert load_tissue_geojson(path).equals(geometry)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tissue GeoJSON"):
        load_tissue_geojson(path)


def test_working_resolution_prefers_a_stored_level_and_respects_the_cap(tmp_path):
    from pipeline.tissue import tissue_mask

    path = tmp_path / "pyr.tif"
    write_synthetic_slide(path, width=1024, height=1024, mpp=0.5, levels=(1, 4, 16), tissue_rects=[(0, 0, 512, 1024)])
    slide = open_slide(path)
    stored = tissue_mask(slide, 0.5, TissueSettings())  # levels at 0.5, 2, 8 µm/px: 8 is used as is
    assert (stored.downsample, stored.mpp, stored.mask.shape) == (16, 8.0, (64, 64))
    finer = tissue_mask(slide, 0.5, TissueSettings(coarsest_mpp=4.0))  # level 1 (2 µm/px) halved
    assert (finer.downsample, finer.mask.shape) == (8.0, (128, 128))
    capped = tissue_mask(slide, 0.5, TissueSettings(coarsest_mpp=4.0, max_side=50))
    assert capped.mask.shape == (50, 50)
    assert abs(capped.mask[:, :25].mean() - 1) < 0.1 and capped.mask[:, 27:].sum() == 0


def test_hsv_saturation_matches_skimage():
    from skimage import color

    from pipeline.tissue import hsv_saturation

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    rgb[0, 0] = 0  # black: saturation 0, not a division by zero
    reference = color.rgb2hsv(rgb)[..., 1] * 255
    assert np.abs(hsv_saturation(rgb).astype(float) - reference).max() <= 0.5 + 1e-9
    assert hsv_saturation(rgb)[0, 0] == 0


@pytest.mark.parametrize("size", [1, 3, 5, 7, 11])
def test_median_equals_scipy_nearest(size):
    from scipy import ndimage

    from pipeline.tissue import median_nearest

    image = np.random.default_rng(size).integers(0, 256, (37, 53), dtype=np.uint8)
    image[:5] = 250  # a flat border band: the edge rule matters
    np.testing.assert_array_equal(median_nearest(image, size), ndimage.median_filter(image, size=size, mode="nearest"))


def test_median_in_row_bands_equals_one_pass(monkeypatch):
    from scipy import ndimage

    import pipeline.tissue as tissue

    monkeypatch.setattr(tissue, "BAND_PIXELS", 9 * 53 * 4)  # 4 rows per band
    image = np.random.default_rng(9).integers(0, 256, (37, 53), dtype=np.uint8)
    np.testing.assert_array_equal(tissue.median_nearest(image, 3), ndimage.median_filter(image, size=3, mode="nearest"))


@pytest.mark.parametrize("rects", [[], [(8, 8, 40, 40)]])
def test_a_slide_smaller_than_the_largest_hole_keeps_its_background(tmp_path, rects):
    # 64² px at 1 µm/px is a 16² mask: its whole background (≤ 256 px) is below max_hole_um2's
    # 250 px, but background that reaches the border is never a hole to fill.
    path = tmp_path / "small.tif"
    write_synthetic_slide(path, width=64, height=64, mpp=MPP, tissue_rects=rects, levels=(1,), tile=64)
    tissue = segment_tissue(open_slide(path), MPP, TissueSettings(min_object_um2=0.0))
    assert tissue.area < 0.6 * 64 * 64
    assert tissue.is_empty == (not rects)


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 6, 10])
def test_disk_closing_is_scipys(radius):
    """The shift-based closing gives scipy's pixels, borders and masks smaller than the disk included."""
    from scipy import ndimage
    from skimage import morphology

    from pipeline.tissue import binary_closing_disk

    rng = np.random.default_rng(radius)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.9)
        if trial % 3 == 0:  # blobs and gaps rather than noise
            mask = ndimage.binary_dilation(rng.random((h, w)) < 0.02, iterations=3)
        expected = ndimage.binary_closing(mask, structure=morphology.disk(radius))
        np.testing.assert_array_equal(binary_closing_disk(mask, radius), expected)
