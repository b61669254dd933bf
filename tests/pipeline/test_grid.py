"""The DESIGN.md §3 region grid: exact counts, coords and origins; level choice."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, box

from pipeline.grid import choose_level, region_grid

MPP0 = 0.5
R = 224
WIDTH, HEIGHT = 3700, 2700  # 8 whole 448-px regions across (3584), 6 down (2688)


@pytest.mark.parametrize(
    ("target_mpp", "step", "shape"),
    [(1.0, 448, (6, 8)), (2.0, 896, (3, 4)), (4.0, 1792, (1, 2))],
)
def test_full_tissue_keeps_every_whole_region(target_mpp, step, shape):
    grid = region_grid(WIDTH, HEIGHT, MPP0, target_mpp, R, box(0, 0, WIDTH, HEIGHT), 0.5)
    assert grid.step == step and grid.grid_shape == shape and len(grid) == shape[0] * shape[1]
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    np.testing.assert_array_equal(grid.coords, np.stack([rows.ravel(), cols.ravel()], 1))
    np.testing.assert_array_equal(grid.origin, grid.coords[:, ::-1] * step)
    assert grid.coords.dtype == np.int32 and grid.origin.dtype == np.int64 and grid.foreground.dtype == np.float32
    np.testing.assert_array_equal(grid.foreground, 1.0)


def test_foreground_threshold_is_exact_polygon_area():
    # At 10× (step 448): the tissue covers cell (1,1) fully, (1,2) exactly half, (2,1) 40 %.
    tissue = MultiPolygon([box(448, 448, 896 + 224, 896), box(448, 896, 448 + 448, 896 + 179.2)])
    grid = region_grid(WIDTH, HEIGHT, MPP0, 1.0, R, tissue, 0.5)
    assert grid.coords.tolist() == [[1, 1], [1, 2]]
    assert grid.origin.tolist() == [[448, 448], [896, 448]]
    np.testing.assert_allclose(grid.foreground, [1.0, 0.5])
    low = region_grid(WIDTH, HEIGHT, MPP0, 1.0, R, tissue, 0.3)
    assert low.coords.tolist() == [[1, 1], [1, 2], [2, 1]]
    np.testing.assert_allclose(low.foreground, [1.0, 0.5, 0.4], rtol=1e-6)


def test_non_integer_step_rounds_origins_and_keeps_whole_regions_only():
    mpp0 = 0.3  # step 224·1/0.3 = 746.67 level-0 px
    width, height = 3000, 1500
    grid = region_grid(width, height, mpp0, 1.0, R, box(0, 0, width, height), 0.5)
    step = R * 1.0 / mpp0
    n_cols = int(np.floor(width / step))  # 4: the 5th region would end at 3733
    assert grid.grid_shape == (2, n_cols)
    expected_x = [round(c * step) for c in range(n_cols)]
    assert expected_x == [0, 747, 1493, 2240]
    assert grid.origin[:n_cols, 0].tolist() == expected_x
    assert grid.origin[n_cols:, 1].tolist() == [747] * n_cols
    # A region whose rounded origin plus the float step ends past the slide does not exist.
    assert region_grid(2986, 746, mpp0, 1.0, R, box(0, 0, 2986, 746), 0.5).grid_shape == (0, 3)
    assert region_grid(2987, 747, mpp0, 1.0, R, box(0, 0, 2987, 747), 0.5).grid_shape == (1, 4)


def test_holes_and_disjoint_parts_count_exactly():
    outer = shapely.Polygon([(0, 0), (896, 0), (896, 448), (0, 448)], [[(100, 100), (324, 100), (324, 324), (100, 324)]])
    tissue = MultiPolygon([outer, box(1344, 0, 1792, 448)])
    grid = region_grid(WIDTH, HEIGHT, MPP0, 1.0, R, tissue, 0.01)
    by_cell = dict(zip(map(tuple, grid.coords.tolist()), grid.foreground.tolist()))
    assert by_cell[(0, 0)] == pytest.approx(1 - 224 * 224 / 448**2)
    assert by_cell[(0, 1)] == 1.0 and by_cell[(0, 3)] == 1.0
    assert (0, 2) not in by_cell  # a zero-area touch is not tissue


def test_no_tissue_gives_an_empty_grid():
    grid = region_grid(WIDTH, HEIGHT, MPP0, 1.0, R, MultiPolygon(), 0.5)
    assert len(grid) == 0 and grid.grid_shape == (6, 8) and grid.coords.shape == (0, 2)


def test_choose_level():
    assert choose_level((1.0, 4.0, 16.0), 8.0) == (1, 2.0)
    assert choose_level((1.0, 4.0, 16.0), 16.0) == (2, 1.0)
    assert choose_level((1.0, 4.0, 16.0), 2.004) == (0, 2.004)
    assert choose_level((1.0, 4.02, 16.08), 4.0) == (1, 1.0)  # within 1 % is exact
    assert choose_level((1.0, 3.0), 4.0) == (1, pytest.approx(4 / 3))
    assert choose_level((1.0,), 1.002) == (0, 1.0)


def test_covered_area_equals_exact_intersections_with_holes():
    import shapely
    from shapely.geometry import Point

    from pipeline.grid import _covered_area

    rng = np.random.default_rng(3)
    blobs = shapely.union_all([Point(*rng.uniform(0, 1000, 2)).buffer(rng.uniform(40, 160)) for _ in range(12)])
    holes = shapely.union_all([Point(*rng.uniform(0, 1000, 2)).buffer(25) for _ in range(8)])
    tissue = shapely.difference(blobs, holes)
    polygons = list(shapely.get_parts(tissue))
    xs, ys = np.meshgrid(np.arange(0, 1000, 37.3), np.arange(0, 1000, 37.3))
    boxes = shapely.box(xs.ravel(), ys.ravel(), xs.ravel() + 37.3, ys.ravel() + 37.3)
    expected = shapely.area(shapely.intersection(boxes, tissue))
    np.testing.assert_allclose(_covered_area(boxes, polygons), expected, rtol=0, atol=1e-6)
