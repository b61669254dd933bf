"""The direct reader writes the same regions as OpenSlide (DESIGN.md §3, issue 11 item 3) on the
real Aperio slide and on demo-cohort pyramids, at every magnification; switching the reader
re-tiles nothing, while the inexact DCT-scaled decoding is a store setting."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.demo_cohort import make_demo_cohort
from pipeline.driver import build_store
from pipeline.schema.errors import StoreMismatchError
from pipeline.schema.reader import open_store

MAGNIFICATIONS = (2.5, 5.0, 10.0, 20.0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, real_slide_path):
    """The real slide and one demo slide per class (pyramid levels 1 and 4 at 1 µm/px)."""
    folder = tmp_path_factory.mktemp("cohort")
    path = folder / "demo.csv"
    make_demo_cohort(real_slide_path, folder / "demo", manifest_path=path, n_per_class=1)
    return path


def _build(manifest, out, magnification, reader, **options):
    """Build and open a store; the only failure allowed is the real slide having no whole
    2.5× region (DESIGN.md §7: at most one)."""
    # The demo slides are 1 µm/px: 20× (0.5 µm/px) upsamples them, which a build refuses unless asked.
    options.setdefault("allow_upsampling", magnification > 10)
    summary = build_store(manifest, out, magnification=magnification, workers=0, progress=False, reader=reader, **options)
    assert all(f.error_type == "NoTissueError" for f in summary.failures), summary.format()
    assert len(summary.written) >= 2, summary.format()
    return open_store(out)


@pytest.mark.parametrize("magnification", MAGNIFICATIONS)
def test_direct_and_openslide_stores_hold_the_same_regions(tmp_path, manifest, magnification):
    direct = _build(manifest, tmp_path / "direct.zarr", magnification, "direct")
    reference = _build(manifest, tmp_path / "openslide.zarr", magnification, "openslide")
    assert direct.slide_ids == reference.slide_ids and len(direct.slide_ids) >= 2
    assert sorted(direct.failures["slide_id"]) == sorted(reference.failures["slide_id"])
    assert set(direct.slides["reader"]) == {"direct"} and set(reference.slides["reader"]) == {"openslide"}
    for slide_id in direct.slide_ids:
        a, b = direct.read_slide(slide_id), reference.read_slide(slide_id)
        assert a.attrs["tissue_geojson"] == b.attrs["tissue_geojson"]  # segmentation sees the same overview
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.foreground, b.foreground)
        assert (a.attrs["level"], a.attrs["resize_factor"]) == (b.attrs["level"], b.attrs["resize_factor"])
        difference = np.abs(np.asarray(a.regions[:], np.int16) - np.asarray(b.regions[:], np.int16))
        assert difference.max() <= 1, f"{slide_id} at {magnification}×: max difference {difference.max()}"


def test_switching_the_reader_re_tiles_nothing(tmp_path, manifest):
    out = tmp_path / "store.zarr"
    _build(manifest, out, 5.0, "openslide")
    summary = build_store(manifest, out, magnification=5.0, workers=0, progress=False, reader="direct")
    assert summary.ok and not summary.written and len(summary.skipped) == 3


def test_scaled_decoding_is_a_store_setting(tmp_path, manifest):
    out = tmp_path / "store.zarr"
    _build(manifest, out, 5.0, "auto")
    with pytest.raises(StoreMismatchError):
        build_store(manifest, out, magnification=5.0, workers=0, progress=False, scaled_decode=True)


def _psnr(a, b) -> float:
    mse = np.mean((np.asarray(a[:], np.float64) - np.asarray(b[:], np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def test_scaled_decoding_stays_close_to_exact(tmp_path, manifest):
    """At 5× the demo slides (1 µm/px, levels 1 and 4) are read at level 0 with an exact 2×
    resize: decoded at 1/2 in libjpeg instead of in full and 2×2-averaged."""
    exact = _build(manifest, tmp_path / "exact.zarr", 5.0, "direct")
    scaled = _build(manifest, tmp_path / "scaled.zarr", 5.0, "direct", scaled_decode=True)
    assert scaled.attrs.decode == {"dct_scaled": True} and exact.attrs.decode == {"dct_scaled": False}
    demo = [s for s in exact.slide_ids if s.startswith("demo_")]
    for slide_id in demo:
        a, b = exact.read_slide(slide_id), scaled.read_slide(slide_id)
        assert (a.attrs["dct_scale"], b.attrs["dct_scale"]) == (1, 2)
        np.testing.assert_array_equal(a.coords, b.coords)
        assert _psnr(a.regions, b.regions) > 40  # measured ≈ 45–50 dB
    # The real slide (0.499 µm/px: a 4.008× resize, decoded at 1/4) differs more, through PIL's BOX filter on
    # the exact path (edge pixels whole or not at all), not through the scaled IDCT.
    a, b = exact.read_slide("cmu_small_region"), scaled.read_slide("cmu_small_region")
    assert b.attrs["dct_scale"] == 4 and _psnr(a.regions, b.regions) > 20
