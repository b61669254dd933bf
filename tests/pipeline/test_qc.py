"""QC pictures: one PNG per slide, longest side ≤ 1000 px, contour and regions drawn."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from synthetic import write_synthetic_slide

from pipeline.driver import build_store
from pipeline.qc import REGION_COLOUR, TISSUE_COLOUR, QcSettings, write_qc


def _store(tmp_path, width, height, magnification=10):
    rows = []
    for i in range(2):
        path = tmp_path / f"q{i}.tif"
        write_synthetic_slide(path, width=width, height=height, mpp=0.5, levels=(1, 2, 4),
                              tissue_rects=[(128, 128, width // 2, height // 2)])
        rows.append(f"q{i},{path}\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\n" + "".join(rows))
    out = tmp_path / "st.zarr"
    assert build_store(manifest, out, magnification=magnification, region_size=32, workers=0, progress=False).ok
    return out


def test_one_png_per_slide_with_contour_and_regions(tmp_path):
    store = _store(tmp_path, 1280, 640)
    paths = write_qc(store, tmp_path / "qc")
    assert sorted(p.name for p in paths) == ["q0.png", "q1.png"]
    picture = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert picture.shape == (500, 1000, 3)  # 1280×640 scaled to a 1000 px longest side
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert TISSUE_COLOUR in colours and REGION_COLOUR in colours
    assert (picture[-20:, -20:] == 255).all()  # background composited on white


def test_small_slide_is_not_upscaled_and_missing_source_still_draws(tmp_path):
    store = _store(tmp_path, 640, 512)
    assert Image.open(write_qc(store, tmp_path / "qc")[0]).size == (640, 512)
    (tmp_path / "q0.tif").unlink()
    small = write_qc(store, tmp_path / "qc2", QcSettings(max_side=200))
    assert all(max(Image.open(p).size) <= 200 for p in small)
    picture = np.asarray(Image.open(small[0]).convert("RGB"))
    assert REGION_COLOUR in {tuple(c) for c in picture.reshape(-1, 3)}


@pytest.mark.slow
def test_real_slide_qc(tmp_path, real_slide_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\ncmu,{real_slide_path}\n")
    out = tmp_path / "st.zarr"
    assert build_store(manifest, out, magnification=10, workers=0, progress=False).ok
    (path,) = write_qc(out, tmp_path / "qc")
    assert Image.open(path).size == (748, 1000)  # 2220×2967 level 0


def test_thumbnail_is_read_in_bands(tmp_path, monkeypatch):
    """A level read in many bands gives the same picture (up to band seams) as one read."""
    from pipeline import qc

    store = _store(tmp_path, 1280, 640)
    whole = np.asarray(Image.open(write_qc(store, tmp_path / "whole")[0]).convert("RGB"), dtype=np.int16)
    reads = []
    original = qc._read_level_scaled

    def counting(slide, *args):
        real_read = slide.read_level
        slide.read_level = lambda *a: reads.append(a) or real_read(*a)
        return original(slide, *args)

    monkeypatch.setattr(qc, "BAND_PIXELS", 1280 * 50)
    monkeypatch.setattr(qc, "_read_level_scaled", counting)
    banded = np.asarray(Image.open(write_qc(store, tmp_path / "banded")[0]).convert("RGB"), dtype=np.int16)
    assert len(reads) == 2 * 13  # two slides, 640 rows each in bands of 50
    assert banded.shape == whole.shape and np.abs(banded - whole).mean() < 2.0


def test_qc_of_a_slide_only_the_direct_reader_opens(tmp_path):
    from synthetic import synthetic_image, write_stripped_tiff

    from pipeline.driver import build_store

    path = tmp_path / "strips.tif"
    write_stripped_tiff(path, synthetic_image(width=512, height=384, tissue_rects=[(64, 64, 256, 192)]), mpp=0.5)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\nstrips,{path}\n")
    out = tmp_path / "s.zarr"
    assert build_store(manifest, out, magnification=10.0, region_size=32, workers=0, progress=False).ok
    picture = Image.open(write_qc(out, tmp_path / "qc")[0]).convert("RGB")
    assert picture.size == (512, 384)
    assert np.asarray(picture).min() < 200  # the slide's pixels, not the white "source not readable" canvas
