"""Region extraction: exact block means on synthetic slides, the resize path, the real slide."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box
from synthetic import block_mean, write_synthetic_slide

from pipeline.extract import iter_regions
from pipeline.grid import choose_level, region_grid
from pipeline.slide import open_slide, read_rgb, resolve_mpp
from pipeline.tissue import TissueSettings, segment_tissue

R = 224
SIZE = 1792


def numpy_block_mean(pixels: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: float mean over k×k blocks, rounded half up."""
    h, w = pixels.shape[0] // k, pixels.shape[1] // k
    mean = pixels[: h * k, : w * k].reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))
    return np.floor(mean + 0.5).astype(np.uint8)


def _extract(path, target_mpp, tissue=None, **kwargs):
    slide = open_slide(path)
    mpp0, _ = resolve_mpp(slide, None)
    width, height = slide.level_dimensions[0]
    grid = region_grid(width, height, mpp0, target_mpp, R, tissue or box(0, 0, width, height), 0.5)
    level, factor = choose_level(slide.level_downsamples, target_mpp / mpp0)
    regions = list(iter_regions(slide, grid, level, R, resize_factor=factor, **kwargs))
    return grid, level, factor, regions


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    path = tmp_path_factory.mktemp("ext") / "pyr.tif"
    image = write_synthetic_slide(path, width=SIZE, height=SIZE, mpp=0.5, levels=(1, 2, 4), tissue_rects=[(0, 0, SIZE, SIZE)])
    return path, image


@pytest.mark.parametrize(("target_mpp", "level", "n"), [(1.0, 1, 16), (2.0, 2, 4)])
def test_exact_levels_give_the_level_pixels(pyramid, target_mpp, level, n):
    path, image = pyramid
    grid, got_level, factor, regions = _extract(path, target_mpp)
    assert (got_level, factor, len(regions)) == (level, 1.0, n)
    level_image = block_mean(image, 2**level)  # what the TIFF stores at that level
    for (row, col), region in zip(grid.coords, regions):
        np.testing.assert_array_equal(region, level_image[row * R : (row + 1) * R, col * R : (col + 1) * R])


def test_integer_resize_is_an_exact_block_mean(pyramid):
    path, image = pyramid
    grid, level, factor, regions = _extract(path, 4.0)  # 2.5×: level 2 (ds 4) then 2×2 block mean
    assert (level, factor, len(regions)) == (2, 2.0, 1)
    level2 = np.asarray(open_slide(path).read_region((0, 0), 2, (448, 448)))[..., :3]
    np.testing.assert_array_equal(regions[0], numpy_block_mean(level2, 2))


def test_single_level_slide_block_mean_from_level0(tmp_path):
    path = tmp_path / "flat.tif"
    image = write_synthetic_slide(path, width=1000, height=900, mpp=0.5, levels=(1,), tissue_rects=[(0, 0, 1000, 900)])
    grid, level, factor, regions = _extract(path, 2.0)
    assert (level, factor, grid.grid_shape) == (0, 4.0, (1, 1))
    np.testing.assert_array_equal(regions[0], numpy_block_mean(image[:896, :896], 4))


def test_non_native_level_takes_the_resize_path(tmp_path):
    path = tmp_path / "ds3.tif"
    image = write_synthetic_slide(path, width=1800, height=1800, mpp=0.5, levels=(1, 3), tissue_rects=[(0, 0, 1800, 1800)])
    grid, level, factor, regions = _extract(path, 2.0)
    assert level == 1 and factor == pytest.approx(4 / 3) and len(regions) == 4
    level1 = Image.fromarray(np.asarray(open_slide(path).read_region((0, 0), 1, (600, 600)))[..., :3])
    span = 896 / 3
    for (x, y), region in zip(grid.origin, regions):
        reference = level1.resize((R, R), Image.Resampling.BOX, box=(x / 3, y / 3, x / 3 + span, y / 3 + span))
        np.testing.assert_array_equal(region, np.asarray(reference))
        truth = numpy_block_mean(image[y : y + 896, x : x + 896], 4)
        assert np.abs(region.astype(int) - truth).mean() < 4


def test_small_blocks_and_sparse_tissue_give_the_same_regions_in_row_major_order(pyramid):
    path, _ = pyramid
    tissue = box(0, 0, 448, SIZE).union(box(1344, 0, SIZE, 900)).union(box(0, 1344, SIZE, SIZE))
    grid, _, _, big = _extract(path, 1.0, tissue=tissue)
    _, _, _, small = _extract(path, 1.0, tissue=tissue, block_px=300, max_gap=0)
    keys = grid.coords[:, 0] * 1000 + grid.coords[:, 1]
    assert (np.diff(keys) > 0).all()
    assert len(big) == len(small) == len(grid) > 4
    for a, b in zip(big, small):
        np.testing.assert_array_equal(a, b)


def test_exact_level_half_pixel_origins_do_not_depend_on_the_read_blocks(tmp_path):
    # mpp0 0.2505 → 1 µm/px needs downsample 3.992: level 2 (ds 4) is exact within 1 %; the
    # step 894.208 gives origin x 894, i.e. level x 223.5, a tie. The region must not change
    # with the block it is read in (half-to-even rounding relative to the block did).
    path = tmp_path / "tie.tif"
    image = write_synthetic_slide(path, width=3600, height=900, mpp=0.2505, levels=(1, 2, 4), tissue_rects=[(0, 0, 3600, 900)])
    grid, level, factor, together = _extract(path, 1.0)
    _, _, _, apart = _extract(path, 1.0, block_px=1)
    assert (level, factor, len(grid)) == (2, 1.0, 4) and grid.origin[1, 0] == 894
    level2 = block_mean(image, 4)
    for (x, y), a, b in zip(grid.origin, together, apart):
        np.testing.assert_array_equal(a, b)
        x2, y2 = int(np.floor(x / 4 + 0.5)), int(np.floor(y / 4 + 0.5))
        np.testing.assert_array_equal(a, level2[y2 : y2 + R, x2 : x2 + R])


@pytest.mark.slow
@pytest.mark.parametrize(("target_mpp", "low", "high"), [(2.0, 1, 3), (1.0, 7, 11)])
def test_real_slide_regions_match_independent_reads(real_slide_path, target_mpp, low, high):
    slide = open_slide(real_slide_path)
    mpp0, source = resolve_mpp(slide, None)
    assert (mpp0, source) == (0.499, "slide")
    tissue = segment_tissue(slide, mpp0, TissueSettings())
    width, height = slide.level_dimensions[0]
    grid = region_grid(width, height, mpp0, target_mpp, R, tissue, 0.5)
    assert low <= len(grid) <= high
    keys = grid.coords[:, 0] * 1000 + grid.coords[:, 1]
    assert (np.diff(keys) > 0).all()
    level, factor = choose_level(slide.level_downsamples, target_mpp / mpp0)
    regions = list(iter_regions(slide, grid, level, R, resize_factor=factor))
    side = int(np.ceil(grid.step))
    for (x, y), region in zip(grid.origin, regions):
        assert region.shape == (R, R, 3) and region.dtype == np.uint8
        raw = Image.fromarray(read_rgb(slide, (x, y), 0, (side, side)))
        reference = np.asarray(raw.resize((R, R), Image.Resampling.BOX, box=(0, 0, grid.step, grid.step)))
        assert np.abs(region.astype(int) - reference).mean() < 2


@pytest.mark.parametrize("factor", [2, 3, 4, 5, 8, 16])
def test_block_mean_is_exact_rounded_half_up_for_every_factor(factor):
    from pipeline.extract import block_mean_uint8

    rng = np.random.default_rng(factor)
    pixels = rng.integers(0, 256, (factor * 9 + 1, factor * 7 + 2, 3), dtype=np.uint8)
    pixels[: factor, : factor] = [[255, 0, 1]]  # extremes
    pixels[factor : 2 * factor, : factor] = 0
    pixels[factor, 0] = 255 if factor * factor % 2 == 0 else 0
    cut = pixels[1:, 2:]  # a strided view, as extraction passes it
    expected = np.floor(cut[: factor * 9, : factor * 7].reshape(9, factor, 7, factor, 3).astype(np.float64).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(block_mean_uint8(cut, factor), expected.astype(np.uint8))


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5, 8, 16, 17])
def test_area_mean_kernel_fallback_and_windows_agree(factor, monkeypatch):
    """pipeline.area: the numba kernel and the numpy fallback give the same means, into and out
    of windows of larger arrays (the layout the reader hands it) or copies of other layouts."""
    from pipeline import area

    rng = np.random.default_rng(factor)
    big = rng.integers(0, 256, (7 * factor + 9, 9 * factor + 11, 3), dtype=np.uint8)
    source = big[3 : 3 + 6 * factor + 1, 5 : 5 + 8 * factor + 2]  # a window, with leftover rows/columns
    expected = numpy_block_mean(source, factor)[:6, :8]
    canvas = np.zeros((10, 12, 3), np.uint8)
    area.mean_into(source, factor, canvas[2:8, 1:9])
    np.testing.assert_array_equal(canvas[2:8, 1:9], expected)
    assert not canvas[:2].any() and not canvas[8:].any() and not canvas[:, :1].any() and not canvas[:, 9:].any()
    np.testing.assert_array_equal(area.mean_into(np.asfortranarray(source), factor, np.empty((6, 8, 3), np.uint8)), expected)
    monkeypatch.setattr(area, "_kernel", lambda: None)
    np.testing.assert_array_equal(area.mean_into(source, factor, np.empty((6, 8, 3), np.uint8)), expected)
