"""Remote, read-only stores over S3 (s3fs), against moto's S3 server on loopback.

The server runs in this process on 127.0.0.1 and a free port, started and stopped by the
fixture; clients are configured the standard way (AWS_* environment variables,
AWS_ENDPOINT_URL included) or with explicit storage options.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from click.testing import CliRunner
from tile_store_helpers import make_store

from pipeline.cli import main
from pipeline.schema.errors import NotATileStoreError, TileStoreError, UnsupportedFormatError
from pipeline.schema.reader import open_store
from pipeline.stage import stage_store
from pipeline.verify import verify_store

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "tiles"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint URL, s3fs filesystem) of a fresh moto S3 server holding two stores."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        patch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    base = tmp_path_factory.mktemp("s3src")
    for codec in ("none", "jpeg"):
        local = make_store(base / f"{codec}.zarr", codec, slides={"a": 3, "b": 6})
        fs.put(str(local), f"{BUCKET}/{codec}.zarr", recursive=True)
    try:
        yield endpoint, fs, base
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        patch.undo()
        server.stop()


@pytest.mark.parametrize("codec", ["none", "jpeg"])
def test_s3_store_reads_like_the_local_one(s3, codec):
    _, _, base = s3
    remote, local = open_store(f"s3://{BUCKET}/{codec}.zarr"), open_store(base / f"{codec}.zarr")
    assert not remote.is_local and remote.slide_ids == ["a", "b"]
    for slide_id in remote.slide_ids:
        np.testing.assert_array_equal(np.asarray(remote.read_slide(slide_id).regions[...]),
                                      np.asarray(local.read_slide(slide_id).regions[...]))
        np.testing.assert_array_equal(remote.read_slide(slide_id).origin, local.read_slide(slide_id).origin)
        remote.verify_slide(slide_id)
    report = verify_store(f"s3://{BUCKET}/{codec}.zarr")
    assert report.ok and report.n_slides == 2


def test_info_with_storage_options_and_stage_from_s3(s3, tmp_path, monkeypatch):
    endpoint, _, base = s3
    options = json.dumps({"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}})
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the explicit options know the server now
    result = CliRunner().invoke(main, ["info", f"s3://{BUCKET}/jpeg.zarr", "--storage-options", options, "--verify"])
    assert result.exit_code == 0, result.output
    assert "2 complete, 0 failed; 9 regions" in result.output and "checksums match" in result.output
    bad = CliRunner().invoke(main, ["info", f"s3://{BUCKET}/jpeg.zarr", "--storage-options", "{not json"])
    assert bad.exit_code == 2 and "--storage-options" in bad.output
    summary = stage_store(f"s3://{BUCKET}/jpeg.zarr", tmp_path / "node.zarr", codec="none",
                          storage_options=json.loads(options))
    assert summary.ok and summary.copied == ("a", "b")
    staged = open_store(tmp_path / "node.zarr")
    assert isinstance(staged.read_slide("b").regions, np.memmap)
    np.testing.assert_array_equal(staged.read_slide("b").regions,
                                  np.asarray(open_store(base / "jpeg.zarr").read_slide("b").regions[...]))


def test_trainer_dataset_reads_an_s3_store(s3):
    from trainer.data.tile_dataset import TileStoreDataset

    _, _, base = s3
    remote = TileStoreDataset(f"s3://{BUCKET}/jpeg.zarr", min_regions=1)
    local = TileStoreDataset(base / "jpeg.zarr", min_regions=1)
    assert len(remote) == 2
    for index in range(2):
        assert remote[index]["slide_id"] == local[index]["slide_id"]
        assert (remote[index]["regions"] == local[index]["regions"]).all()


def test_s3_errors_are_clear(s3):
    _, fs, _ = s3
    with pytest.raises(NotATileStoreError, match="has no zarr.json"):
        open_store(f"s3://{BUCKET}/nothing-here.zarr")
    root = json.loads(fs.cat(f"{BUCKET}/none.zarr/zarr.json"))
    future = json.loads(json.dumps(root))
    future["attributes"]["tile_store"]["version"] = "2.0"
    fs.pipe(f"{BUCKET}/future.zarr/zarr.json", json.dumps(future).encode())
    fs.pipe(f"{BUCKET}/future.zarr/slides.json", b'{"slides": []}')
    with pytest.raises(UnsupportedFormatError, match="version 2.0 is not supported"):
        open_store(f"s3://{BUCKET}/future.zarr")
    fs.pipe(f"{BUCKET}/half.zarr/zarr.json", json.dumps(root).encode())  # root written, no table yet
    with pytest.raises(NotATileStoreError, match="slides.json is missing"):
        open_store(f"s3://{BUCKET}/half.zarr")
    fs.pipe(f"{BUCKET}/bare.zarr/zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(NotATileStoreError, match="creation may have been interrupted"):
        open_store(f"s3://{BUCKET}/bare.zarr")
    with pytest.raises(TileStoreError, match="cannot read s3://.*AWS_ENDPOINT_URL"):
        open_store("s3://tiles/x.zarr", storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"},
                                                        "config_kwargs": {"retries": {"max_attempts": 1},
                                                                          "connect_timeout": 1}})
