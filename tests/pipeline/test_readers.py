"""pipeline.readers: one suite run against every backend, then what only the direct reader does
(OME-TIFF SubIFD pyramids, stripped TIFFs, DCT-scaled decoding) and the fallback to OpenSlide."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from synthetic import block_mean, synthetic_image, write_ome_pyramid, write_stripped_tiff, write_synthetic_slide

from pipeline.manifest import ManifestRow
from pipeline.process import ProcessSettings, process_slide
from pipeline.readers import OpenSlideReader, TiffReader, open_reader
from pipeline.readers import tiff_reader as tiff_reader_module
from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import reconcile
from pipeline.schema.format import StoreAttrs
from pipeline.schema.reader import open_store
from pipeline.slide import NotASlideError, SlideNotFoundError, UnreadableSlideError, resolve_mpp
from pipeline.store_writer import create_store
from pipeline.tissue import TissueSettings

W, H = 700, 520  # not multiples of the 256-px tiles: edge tiles are partial
LEVELS = (1, 2, 4)
TISSUE = [(40, 30, 560, 440)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def expected_window(level_image: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """What a reader must return: the level's pixels, white outside it."""
    out = np.full((h, w, 3), 255, np.uint8)
    lh, lw = level_image.shape[:2]
    xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
    if xa < xb and ya < yb:
        out[ya - y : yb - y, xa - x : xb - x] = level_image[ya:yb, xa:xb]
    return out


@pytest.fixture(scope="module")
def raw_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "raw.tif"
    image = write_synthetic_slide(path, width=W, height=H, mpp=0.5, levels=LEVELS, tissue_rects=TISSUE)
    return path, image


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("jpeg") / "jpeg.tif"
    image = write_synthetic_slide(path, width=W, height=H, mpp=0.5, levels=LEVELS, tissue_rects=TISSUE, compression="jpeg")
    return path, image


def _store(path, target_mpp=2.0):
    create_store(path, StoreAttrs(
        magnification=5.0, mpp=target_mpp, region_size=32, min_foreground=0.5, codec=codec_settings("none"),
        segmentation=TissueSettings().to_json(), pipeline_version="test",
    ))
    return str(path)


def _opened(store: str):
    """The store as readers see it, once the driver's table step (reconcile) has run."""
    reconcile(store)
    return open_store(store)


# ---------------------------------------------------------------- every backend

@pytest.mark.parametrize("backend", ["direct", "openslide"])
class TestEveryReader:
    def test_pyramid_geometry(self, raw_slide, backend):
        with open_reader(raw_slide[0], backend) as reader:
            assert reader.name == backend and reader.fallback is None
            assert reader.level_dimensions == ((700, 520), (350, 260), (175, 130))
            assert reader.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
            assert resolve_mpp(reader, None) == (0.5, "slide")

    @pytest.mark.parametrize("level", range(len(LEVELS)))
    def test_windows_match_the_pixels_and_are_white_outside(self, raw_slide, backend, level):
        path, image = raw_slide
        truth = image if LEVELS[level] == 1 else block_mean(image, LEVELS[level])
        lh, lw = truth.shape[:2]
        with open_reader(path, backend) as reader:
            for x, y, w, h in [(0, 0, lw, lh), (-9, -5, lw + 30, lh + 17), (lw - 20, 3, 50, 40), (lw + 5, lh + 5, 8, 8), (250, 250, 13, 300)]:
                np.testing.assert_array_equal(reader.read_level(level, x, y, w, h), expected_window(truth, x, y, w, h))

    def test_openslide_style_read_uses_level0_coordinates(self, raw_slide, backend):
        path, image = raw_slide
        with open_reader(path, backend) as reader:
            got = reader.read_rgb((200, 100), 1, (64, 32))
        np.testing.assert_array_equal(got, block_mean(image, 2)[50:82, 100:164])

    def test_missing_and_empty_files(self, tmp_path, backend):
        with pytest.raises(SlideNotFoundError):
            open_reader(tmp_path / "absent.tif", backend)
        (tmp_path / "empty.tif").write_bytes(b"")
        with pytest.raises(UnreadableSlideError, match="empty"):
            open_reader(tmp_path / "empty.tif", backend)

    def test_truncated_file_is_unreadable_not_a_fallback(self, tmp_path, raw_slide, backend):
        data = raw_slide[0].read_bytes()
        cut = tmp_path / "cut.tif"
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(UnreadableSlideError, match="truncated|unreadable"):
            open_reader(cut, backend)


def test_unknown_reader_name(raw_slide):
    with pytest.raises(ValueError, match="auto, direct, openslide"):
        open_reader(raw_slide[0], "bioformats")


def test_auto_picks_the_direct_reader_for_tiled_tiff(raw_slide):
    with open_reader(raw_slide[0]) as reader:
        assert isinstance(reader, TiffReader) and reader.description == "direct"


# ---------------------------------------------------------------- direct = OpenSlide on JPEG tiles

@pytest.mark.parametrize("level", range(len(LEVELS)))
def test_direct_jpeg_decoding_equals_openslide(jpeg_slide, level):
    path, _ = jpeg_slide
    with open_reader(path, "direct") as direct, open_reader(path, "openslide") as reference:
        lw, lh = direct.level_dimensions[level]
        for x, y, w, h in [(-3, -3, lw + 6, lh + 6), (100, 17, 300, 200)]:
            a = direct.read_level(level, x, y, w, h).astype(int)
            b = reference.read_level(level, x, y, w, h)
            assert np.abs(a - b).max() <= 1


def test_direct_equals_openslide_on_the_real_aperio_slide(real_slide_path):
    """Aperio's JPEG tiles are RGB-coded (no YCbCr transform): decoded with that colour space."""
    with open_reader(real_slide_path, "direct") as direct, open_reader(real_slide_path, "openslide") as reference:
        assert direct.level_dimensions == reference.level_dimensions
        assert resolve_mpp(direct, None) == resolve_mpp(reference, None) == (0.499, "slide")
        assert direct.metadata().objective_power == reference.metadata().objective_power == 20.0
        w, h = direct.level_dimensions[0]
        for x, y, bw, bh in [(-7, -7, w + 14, h + 14), (1000, 1200, 481, 350)]:
            assert np.abs(direct.read_level(0, x, y, bw, bh).astype(int) - reference.read_level(0, x, y, bw, bh)).max() <= 1


def test_pyramid_with_uneven_steps_has_the_levels_openslide_sees(tmp_path):
    """tifffile's generic series stops at the first step that is not 2×; OpenSlide does not."""
    path = tmp_path / "uneven.tif"
    write_synthetic_slide(path, width=1024, height=768, mpp=0.5, levels=(1, 2, 8), tissue_rects=TISSUE, compression="jpeg")
    with open_reader(path, "direct") as direct, open_reader(path, "openslide") as reference:
        assert direct.level_dimensions == reference.level_dimensions == ((1024, 768), (512, 384), (128, 96))
        assert direct.level_downsamples == pytest.approx(reference.level_downsamples)
        a, b = direct.read_level(2, 0, 0, 128, 96), reference.read_level(2, 0, 0, 128, 96)
        assert np.abs(a.astype(int) - b).max() <= 1


# ---------------------------------------------------------------- OME-TIFF and stripped TIFF

@pytest.mark.parametrize("compression", [None, "jpeg"])
def test_ome_tiff_pyramid_levels_and_physical_size(tmp_path, compression):
    path = tmp_path / "slide.ome.tif"
    image = synthetic_image(width=W, height=H, tissue_rects=TISSUE)
    levels = write_ome_pyramid(path, image, mpp=0.25, compression=compression)
    with open_reader(path, "openslide") as reference:  # what a user got before: one level, no MPP
        assert len(reference.level_dimensions) == 1
        assert reference.metadata().vendor_mpp_xy is None
    with open_reader(path) as reader:
        assert reader.name == "direct"
        assert reader.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        assert resolve_mpp(reader, None) == (0.25, "ome-physical-size")
        for k, level in enumerate(levels):
            decoded = tifffile.imread(path, series=0, level=k)
            np.testing.assert_array_equal(reader.read_level(k, 0, 0, level.shape[1], level.shape[0]), decoded)
            if compression is None:
                np.testing.assert_array_equal(decoded, level)


def test_ome_tiff_tiles_from_its_pyramid_level(tmp_path):
    path = tmp_path / "slide.ome.tif"
    write_ome_pyramid(path, synthetic_image(width=W, height=H, tissue_rects=TISSUE), mpp=0.25, compression=None)
    store = _store(tmp_path / "s.zarr", target_mpp=1.0)
    result = process_slide(ManifestRow(slide_id="ome", path=str(path)), store, ProcessSettings(target_mpp=1.0, region_size=32))
    assert result.ok, result.failure
    assert result.record.mpp_source == "ome-physical-size" and result.record.reader == "direct"
    attrs = _opened(store).read_slide("ome").attrs
    assert attrs["level"] == 2 and attrs["resize_factor"] == 1.0  # 4× level of a 0.25 µm/px scan = 1 µm/px


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_stripped_tiff_reads_in_bands(tmp_path, compression):
    path = tmp_path / "strips.tif"
    image = synthetic_image(width=W, height=H, tissue_rects=TISSUE)
    write_stripped_tiff(path, image, mpp=0.5, rows_per_strip=24, compression=compression)
    with pytest.raises(NotASlideError):
        open_reader(path, "openslide")
    with open_reader(path) as reader:
        assert reader.name == "direct" and reader.level_dimensions == ((W, H),)
        for x, y, w, h in [(0, 0, W, H), (-4, 30, 100, 50), (600, 500, 200, 40)]:
            np.testing.assert_array_equal(reader.read_level(0, x, y, w, h), expected_window(image, x, y, w, h))


def test_uncompressed_strips_read_only_the_rows_asked_for(tmp_path, monkeypatch):
    path = tmp_path / "one_strip.tif"
    image = synthetic_image(width=W, height=H, tissue_rects=TISSUE)
    write_stripped_tiff(path, image, mpp=0.5, rows_per_strip=H)  # one strip: the whole image
    sizes = []
    real_pread = os.pread
    monkeypatch.setattr(tiff_reader_module.os, "pread", lambda fd, n, offset: sizes.append(n) or real_pread(fd, n, offset))
    with open_reader(path, "direct") as reader:
        band = reader.read_level(0, 10, 100, 50, 20)
    np.testing.assert_array_equal(band, image[100:120, 10:60])
    assert sum(sizes) == 20 * W * 3  # 20 rows, not the 520-row strip


def test_stripped_tiff_tiles_end_to_end(tmp_path):
    path = tmp_path / "strips.tif"
    write_stripped_tiff(path, synthetic_image(width=W, height=H, tissue_rects=TISSUE), mpp=0.5, rows_per_strip=8)
    store = _store(tmp_path / "s.zarr")
    result = process_slide(ManifestRow(slide_id="strips", path=str(path)), store, ProcessSettings(target_mpp=2.0, region_size=32))
    assert result.ok, result.failure
    assert result.n_regions > 0 and result.record.reader == "direct"


# ---------------------------------------------------------------- fallback

def test_what_the_direct_reader_cannot_read_falls_back_to_openslide(tmp_path):
    path = tmp_path / "planes.tif"
    image = synthetic_image(width=512, height=512, tissue_rects=[(0, 0, 512, 512)])
    px_per_cm = 1e4 / 0.5
    tifffile.imwrite(path, np.moveaxis(image, 2, 0).copy(), tile=(256, 256), photometric="rgb", planarconfig="separate",
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", metadata=None)
    with pytest.raises(NotASlideError, match="direct reader cannot read .*separately"):
        open_reader(path, "direct")
    with open_reader(path) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.description.startswith("openslide (fallback: direct: level 0 stores colour planes separately")
        np.testing.assert_array_equal(reader.read_level(0, 0, 0, 512, 512), image)
    store = _store(tmp_path / "s.zarr")
    result = process_slide(ManifestRow(slide_id="planes", path=str(path)), store, ProcessSettings(target_mpp=2.0, region_size=32))
    assert result.ok and result.record.reader.startswith("openslide (fallback: direct:")
    opened = _opened(store)
    assert opened.read_slide("planes").attrs["reader"] == result.record.reader
    assert opened.slides["reader"].tolist() == [result.record.reader]


# ---------------------------------------------------------------- DCT-scaled decoding (inexact)

@pytest.mark.parametrize("scale", [2, 4, 8])
def test_scaled_decoding_is_close_to_decoding_in_full_and_averaging(jpeg_slide, scale):
    path, _ = jpeg_slide
    with open_reader(path, "direct") as reader:
        assert reader.scales(0) == (2, 4, 8)
        full = reader.read_level(0, 0, 0, 512, 512)
        scaled = reader.read_level(0, 0, 0, 512 // scale, 512 // scale, scale=scale)
    assert scaled.shape == (512 // scale, 512 // scale, 3)
    assert psnr(scaled, block_mean(full, scale)) > 30


def test_scaled_decoding_of_aperio_rgb_tiles_keeps_their_colours(real_slide_path):
    with open_reader(real_slide_path, "direct") as reader:
        full = reader.read_level(0, 0, 0, 960, 960)
        scaled = reader.read_level(0, 0, 0, 240, 240, scale=4)
    assert psnr(scaled, block_mean(full, 4)) > 30  # a wrong YCbCr conversion scores ≈ 10 dB


def test_scaled_decoding_needs_jpeg_tiles(raw_slide):
    with open_reader(raw_slide[0], "direct") as reader:
        assert reader.scales(0) == ()
        with pytest.raises(ValueError, match="not available"):
            reader.read_level(0, 0, 0, 10, 10, scale=2)


def test_decoder_threads_give_the_same_pixels(jpeg_slide):
    path, _ = jpeg_slide
    with open_reader(path, "direct") as one, open_reader(path, "direct", threads=2) as two:
        np.testing.assert_array_equal(one.read_level(0, -5, 3, 690, 510), two.read_level(0, -5, 3, 690, 510))
        assert two._pool is not None  # the block spanned several tiles: decoded in the pool
    assert two._pool is None  # closed with the reader


# ---------------------------------------------------------------- k×k means straight from the tiles

@pytest.mark.parametrize("backend", ["direct", "openslide"])
@pytest.mark.parametrize("factor", [2, 3, 4, 8])
def test_read_level_mean_is_the_block_mean_of_the_window(raw_slide, backend, factor):
    """Inside the level on whole tiles (averaged tile by tile by the direct reader), across its
    odd right/bottom edges, past them, and with k not dividing the tile (the fallback)."""
    path, image = raw_slide
    k = factor
    with open_reader(path, backend) as reader:
        for level in range(len(LEVELS)):
            truth = image if LEVELS[level] == 1 else block_mean(image, LEVELS[level])
            lh, lw = truth.shape[:2]
            windows = [(0, 0, lw // k, lh // k), (3, 5, 40, 30), (lw // k - 7, lh // k - 6, 9, 8), (-2, -1, 6, 5),
                       (lw // k + 2, 0, 4, 4), (128 // k + 1, 1, 64 // k + 3, 256 // k + 2)]
            for x, y, w, h in windows:
                expected = block_mean(expected_window(truth, x * k, y * k, w * k, h * k), k)
                np.testing.assert_array_equal(reader.read_level_mean(level, x, y, w, h, k), expected, err_msg=str((level, x, y, w, h)))


def test_read_level_mean_treats_a_missing_tile_as_white(jpeg_slide):
    path, _ = jpeg_slide
    with open_reader(path, "direct") as reader:
        reader._levels[0].counts[1] = 0  # tile (0, 1): a 0-byte (missing) tile, white in OpenSlide
        expected = block_mean(reader.read_level(0, 200, 8, 160, 96), 2)
        got = reader.read_level_mean(0, 100, 4, 80, 48, 2)
    np.testing.assert_array_equal(got, expected)
    assert (got[:, 28:] == 255).all() and not (got[:, :28] == 255).all()


@pytest.mark.parametrize("target_mpp, level, factor", [(2.0, 2, 1.0), (2.0, 0, 4.0), (1.0, 0, 2.0), (1.3, 0, 2.6), (1.3, 1, 1.3)])
def test_region_by_region_reads_give_the_block_reads_pixels(jpeg_slide, target_mpp, level, factor):
    """The direct reader's per-region reads (`small_reads`: tile pieces copied or averaged straight
    into each region) give exactly the regions of whole-block reads, for the exact, integer-mean and
    BOX resize paths, near the level's edges included."""
    from shapely.geometry import box

    from pipeline.extract import iter_regions
    from pipeline.grid import region_grid

    path, _ = jpeg_slide
    with open_reader(path, "direct") as reader:
        grid = region_grid(W, H, 0.5, target_mpp, 32, box(0, 0, W, H), 0.5)
        per_region = list(iter_regions(reader, grid, level, 32, resize_factor=factor))
        reader.small_reads = False  # whole blocks, as any other backend reads
        blocks = list(iter_regions(reader, grid, level, 32, resize_factor=factor, block_px=300))
    assert len(per_region) == len(grid) >= 20
    for a, b in zip(per_region, blocks, strict=True):
        np.testing.assert_array_equal(a, b)
