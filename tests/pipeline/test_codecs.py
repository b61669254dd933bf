"""Codec registry and the `pixel_mamba.jpeg8` zarr codec."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from tile_store_helpers import smooth_regions

from pipeline.schema import codecs
from pipeline.schema.errors import MissingCodecError


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", ["none", "zstd", "jpeg"])
def test_region_array_round_trip_through_zarr(name):
    regions = smooth_regions(6, 32)
    kwargs = codecs.region_array_kwargs(codecs.codec_settings(name), n_regions=6, region_size=32)
    array = zarr.create_array(zarr.storage.MemoryStore(), name="regions", **kwargs)
    array[:] = regions
    back = array[:]
    assert back.shape == (6, 32, 32, 3) and back.dtype == np.uint8
    if name == "jpeg":
        assert psnr(back, regions) > 30
    else:
        np.testing.assert_array_equal(back, regions)


def test_layouts_match_the_format():
    none = codecs.region_array_kwargs(codecs.codec_settings("none"), n_regions=7, region_size=8)
    assert none["chunks"] == (7, 8, 8, 3) and none["compressors"] is None and "shards" not in none
    for name in ("zstd", "jpeg"):
        kw = codecs.region_array_kwargs(codecs.codec_settings(name), n_regions=7, region_size=8)
        assert kw["chunks"] == (1, 8, 8, 3) and kw["shards"] == (7, 8, 8, 3)


def test_jpeg_codec_metadata_round_trips_by_its_registered_name():
    array = zarr.create_array(
        zarr.storage.MemoryStore(), name="r",
        **codecs.region_array_kwargs(codecs.codec_settings("jpeg", quality=75), n_regions=2, region_size=16),
    )
    meta = array.metadata.to_dict()
    inner = meta["codecs"][0]["configuration"]["codecs"][0]
    assert inner == {"name": codecs.JPEG_CODEC_ID, "configuration": {"quality": 75}}
    assert zarr.registry.get_codec_class(codecs.JPEG_CODEC_ID) is codecs.Jpeg8Codec


def test_chunk_encoder_matches_zarr_inner_chunks():
    region = smooth_regions(1, 16)[0]
    jpeg = codecs.region_chunk_encoder(codecs.codec_settings("jpeg"))(region)
    np.testing.assert_array_equal(
        codecs.decode_jpeg(jpeg, (1, 16, 16, 3))[0],
        codecs.decode_jpeg(codecs.encode_jpeg(region[None], quality=90), (1, 16, 16, 3))[0],
    )
    with pytest.raises(ValueError, match="no inner chunks"):
        codecs.region_chunk_encoder(codecs.codec_settings("none"))


def test_settings_are_checked():
    assert codecs.codec_settings("zstd") == {"name": "zstd", "zarr_codec": "zstd", "level": 3}
    assert codecs.codec_settings("jpeg")["quality"] == 90
    with pytest.raises(ValueError, match="unknown codec 'lz4'"):
        codecs.codec_settings("lz4")
    with pytest.raises(ValueError, match="quality must be in 1..100"):
        codecs.codec_settings("jpeg", quality=0)
    with pytest.raises(ValueError, match="takes no setting"):
        codecs.codec_settings("none", level=3)
    with pytest.raises(ValueError, match="uint8"):
        codecs.encode_jpeg(np.zeros((4, 4, 3), np.float32), quality=90)


def test_require_codec_names_the_missing_package(monkeypatch):
    monkeypatch.setattr(codecs.importlib, "import_module", _fail_import)
    assert codecs.codec_available("none")
    with pytest.raises(MissingCodecError, match="imagecodecs"):
        codecs.require_codec("jpeg")
    with pytest.raises(MissingCodecError, match="numcodecs"):
        codecs.require_codec("zstd")


def _fail_import(name):
    raise ImportError(name)
