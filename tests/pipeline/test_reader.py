"""Reader: open_store over every layout, local and HTTP; refusals."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import numpy as np
import pytest
from tile_store_helpers import make_store, smooth_regions

from pipeline.schema import codecs
from pipeline.schema.errors import (
    ChecksumError,
    MissingCodecError,
    NotATileStoreError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from pipeline.schema.reader import open_store


@pytest.mark.parametrize("codec", ["none", "zstd", "jpeg"])
def test_round_trip_every_codec(tmp_path, codec):
    store = open_store(make_store(tmp_path / "s.zarr", codec, slides={"a": 5, "b": 3}))
    assert store.slide_ids == ["a", "b"] and store.attrs.codec["name"] == codec
    assert list(store.slides["n_regions"]) == [5, 3] and list(store.slides["site"]) == ["x", "x"]
    assert store.failures.empty
    slide = store.read_slide("a")
    expected = smooth_regions(5, seed=0)
    regions = np.asarray(slide.regions[:])
    if codec == "jpeg":
        mse = np.mean((regions.astype(float) - expected) ** 2)
        assert 10 * np.log10(255**2 / mse) > 30
    else:
        np.testing.assert_array_equal(regions, expected)
    assert isinstance(slide.regions, np.memmap) == (codec == "none")
    np.testing.assert_array_equal(np.asarray(slide.regions[3]), regions[3])  # one region from the shard
    assert slide.coords.tolist()[:2] == [[0, 0], [0, 1]] and slide.origin.dtype == np.int64
    assert slide.foreground.shape == (5,) and slide.attrs["fingerprint"] == "fp-a"
    store.verify_slide("a")


def test_memmap_falls_back_to_zarr_when_chunk_is_not_raw(tmp_path):
    path = make_store(tmp_path / "s.zarr", slides={"a": 2})
    chunk = path / "slides/a/regions/c/0/0/0/0"
    chunk.write_bytes(chunk.read_bytes() + b"x")  # wrong size: not mapped
    slide = open_store(path).read_slide("a")
    assert not isinstance(slide.regions, np.memmap)
    with pytest.raises(ChecksumError, match="regions"):
        open_store(path).verify_slide("a")


def test_refuses_unknown_major_version_and_format(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["tile_store"]["version"] = "2.0"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UnsupportedFormatError, match="version 2.0 is not supported"):
        open_store(path)
    meta["attributes"]["tile_store"].update(version="1.3", format="other")
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UnsupportedFormatError, match="'other'"):
        open_store(path)


def test_refuses_non_stores(tmp_path):
    with pytest.raises(NotATileStoreError, match="no zarr.json"):
        open_store(tmp_path)
    (tmp_path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(NotATileStoreError, match="creation may have been interrupted"):
        open_store(tmp_path)


def test_refuses_store_whose_codec_is_missing(tmp_path, monkeypatch):
    path = make_store(tmp_path / "s.zarr", "jpeg")
    monkeypatch.setattr(codecs, "codec_available", lambda name: name != "jpeg")
    with pytest.raises(MissingCodecError, match="imagecodecs"):
        open_store(path)


def test_unknown_or_failed_slide(tmp_path):
    from pipeline.schema.commit import read_table, write_table
    from pipeline.schema.format import FailureRecord

    path = make_store(tmp_path / "s.zarr", slides={"a": 1})
    write_table(path, read_table(path).with_failure(
        FailureRecord(slide_id="f", source_path="/f.svs", reason="no MPP in the slide", error_type="NoMppError")))
    store = open_store(path)
    assert store.failures.to_dict("records")[0]["reason"] == "no MPP in the slide"
    with pytest.raises(SlideNotFoundError, match="it failed: no MPP"):
        store.read_slide("f")
    with pytest.raises(SlideNotFoundError, match="'zz' is not a complete slide"):
        store.read_slide("zz")


def test_only_the_table_is_trusted(tmp_path):
    path = make_store(tmp_path / "s.zarr", slides={"a": 1})
    from pipeline.store_writer import write_slide

    write_slide(path, "hidden", regions=iter(smooth_regions(1)), n_regions=1, coords=np.zeros((1, 2), int),
                origin=np.zeros((1, 2), int), foreground=np.ones(1), attrs={"source_path": "x", "fingerprint": "f"})
    assert open_store(path).slide_ids == ["a"]


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path over HTTP on loopback; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", ["none", "jpeg"])
def test_reader_over_http(tmp_path, http_root, codec):
    make_store(tmp_path / "s.zarr", codec, slides={"a": 4, "b": 2})
    local = open_store(tmp_path / "s.zarr")
    remote = open_store(f"{http_root}/s.zarr")
    assert not remote.is_local and remote.slide_ids == ["a", "b"]
    assert remote.attrs == local.attrs
    slide = remote.read_slide("a")
    assert not isinstance(slide.regions, np.memmap)
    np.testing.assert_array_equal(slide.regions[:], np.asarray(local.read_slide("a").regions[:]))
    np.testing.assert_array_equal(slide.origin, local.read_slide("a").origin)
    remote.verify_slide("a")
    with pytest.raises(NotATileStoreError):
        open_store(f"{http_root}/missing.zarr")


def test_slide_in_table_but_group_deleted(tmp_path):
    import shutil

    from pipeline.schema.errors import TileStoreError

    path = make_store(tmp_path / "s.zarr", slides={"a": 1})
    store = open_store(path)
    shutil.rmtree(path / "slides" / "a")
    with pytest.raises(TileStoreError, match="arrays are missing"):
        store.read_slide("a")
