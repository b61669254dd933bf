"""Store creation and streamed slide writing (all three region layouts)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from tile_store_helpers import REGION, smooth_regions, store_attrs, write_example_slide

from pipeline.schema.checksums import ArrayHasher, array_checksum, slide_checksum
from pipeline.schema.commit import read_table
from pipeline.schema.errors import NotATileStoreError, SlideWriteError, StoreMismatchError
from pipeline.store_writer import create_store, read_store_attrs, write_slide

CODECS = ["none", "zstd", "jpeg"]


@pytest.mark.parametrize("codec", CODECS)
def test_written_slide_reads_back_through_plain_zarr(tmp_path, codec):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs(codec))
    regions = smooth_regions(9)
    result = write_example_slide(store, "slide_1", regions)
    group = zarr.open_group(store, mode="r")["slides/slide_1"]
    back = group["regions"][:]
    if codec == "jpeg":
        assert np.abs(back.astype(int) - regions).mean() < 4
    else:
        np.testing.assert_array_equal(back, regions)
    assert group["coords"].dtype == np.int32 and group["origin"].dtype == np.int64
    assert group["foreground"].dtype == np.float32 and group["foreground"].shape == (9,)
    attrs = dict(group.attrs)
    assert attrs["checksum"] == result["checksum"] and attrs["checksums"] == result["checksums"]
    assert attrs["n_regions"] == 9 and attrs["extra"] == {"site": "x"}
    assert set(result["checksums"]) == {"regions", "coords", "origin", "foreground"}
    assert [p.name for p in (store / "slides").iterdir() if p.is_dir()] == ["slide_1"]  # no temp left


def test_none_layout_chunk_file_is_the_raw_array(tmp_path):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("none"))
    regions = smooth_regions(5)
    write_example_slide(store, "a", regions)
    chunk = store / "slides/a/regions/c/0/0/0/0"
    assert chunk.read_bytes() == regions.tobytes()
    meta = json.loads((store / "slides/a/regions/zarr.json").read_text())
    assert meta["codecs"] == [{"name": "bytes"}]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [5, REGION, REGION, 3]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", [0, 1, 6])
def test_recorded_checksums_are_those_of_the_stored_files(tmp_path, codec, n):
    """The raw chunk is hashed while streamed, a shard read back: both must give what
    `array_checksum` computes from the stored files (as readers do)."""
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs(codec))
    result = write_example_slide(store, "a", smooth_regions(n))

    def from_files(name):
        array_dir = store / "slides/a" / name

        def read(key):
            path = array_dir / key
            return (path.stat().st_size, [path.read_bytes()]) if path.is_file() else None

        return array_checksum(json.loads((array_dir / "zarr.json").read_text()), read)

    computed = {name: from_files(name) for name in ("regions", "coords", "origin", "foreground")}
    assert result["checksums"] == computed and result["checksum"] == slide_checksum(computed)


def test_array_hasher_wants_keys_in_order_and_whole():
    hasher = ArrayHasher()
    hasher.begin("c/0", 3)
    hasher.update(b"ab")
    with pytest.raises(OSError, match="read 2 bytes, expected 3"):
        hasher.end()
    hasher.update(b"c")
    hasher.end()
    with pytest.raises(ValueError, match="sorted order"):
        hasher.begin("c/0", 0)


def test_regions_may_arrive_in_batches_and_as_a_generator(tmp_path):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("zstd"))
    regions = smooth_regions(7)
    batches = (regions[i : i + 3] for i in range(0, 7, 3))
    write_slide(store, "b", regions=batches, n_regions=7, coords=np.zeros((7, 2), int),
                origin=np.zeros((7, 2), int), foreground=np.ones(7), attrs={"source_path": "x", "fingerprint": "f"})
    np.testing.assert_array_equal(zarr.open_array(store / "slides/b/regions", mode="r")[:], regions)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("actual", [3, 5])
def test_wrong_region_count_raises_and_commits_nothing(tmp_path, codec, actual):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs(codec))
    with pytest.raises(SlideWriteError, match="expected n_regions=4"):
        write_slide(store, "c", regions=iter(smooth_regions(actual)), n_regions=4, coords=np.zeros((4, 2), int),
                    origin=np.zeros((4, 2), int), foreground=np.ones(4), attrs={"source_path": "x", "fingerprint": "f"})
    assert not (store / "slides/c").exists()
    assert not [p for p in (store / "slides").iterdir() if p.is_dir()]


def test_bad_inputs_get_specific_errors(tmp_path):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("none"))
    ok = dict(n_regions=1, coords=np.zeros((1, 2), int), origin=np.zeros((1, 2), int), foreground=np.ones(1),
              attrs={"source_path": "x", "fingerprint": "f"})
    with pytest.raises(SlideWriteError, match="characters outside"):
        write_slide(store, "bad/id", regions=iter(smooth_regions(1)), **ok)
    # path parts, the temporary groups' namespace, the slides group's own metadata
    for reserved in (".", "..", ".tmp-x", "zarr.json", "Zarr.JSON"):
        with pytest.raises(SlideWriteError, match="reserves"):
            write_slide(store, reserved, regions=iter(smooth_regions(1)), **ok)
    assert sorted(p.name for p in (store / "slides").iterdir()) == ["zarr.json"]
    with pytest.raises(SlideWriteError, match=r"expected \(16, 16, 3\)"):
        write_slide(store, "d", regions=iter([np.zeros((8, 8, 3), np.uint8)]), **ok)
    with pytest.raises(SlideWriteError, match="uint8"):
        write_slide(store, "d", regions=iter([np.zeros((16, 16, 3), np.float32)]), **ok)
    with pytest.raises(SlideWriteError, match=r"attrs lack \['fingerprint'\]"):
        write_slide(store, "d", regions=iter(smooth_regions(1)), **{**ok, "attrs": {"source_path": "x"}})
    with pytest.raises(SlideWriteError, match="coords has shape"):
        write_slide(store, "d", regions=iter(smooth_regions(1)), **{**ok, "coords": np.zeros((2, 2), int)})


def test_empty_slide_is_allowed(tmp_path):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("none"))
    write_slide(store, "e", regions=iter([]), n_regions=0, coords=np.zeros((0, 2), int),
                origin=np.zeros((0, 2), int), foreground=np.zeros(0), attrs={"source_path": "x", "fingerprint": "f"})
    assert zarr.open_array(store / "slides/e/regions", mode="r").shape == (0, REGION, REGION, 3)


def test_rewriting_a_slide_replaces_it(tmp_path):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("none"))
    write_example_slide(store, "a", smooth_regions(3, seed=1))
    second = smooth_regions(5, seed=2)
    write_example_slide(store, "a", second)
    assert (store / "slides/a/regions/c/0/0/0/0").read_bytes() == second.tobytes()
    assert [p.name for p in (store / "slides").iterdir() if p.is_dir()] == ["a"]


def test_create_store_is_idempotent_and_refuses_other_settings(tmp_path):
    store = tmp_path / "s.zarr"
    first = create_store(store, store_attrs("none"))
    assert first.created and read_store_attrs(store) == first
    assert create_store(store, store_attrs("none")) == first
    assert read_table(store).slides == {}
    with pytest.raises(StoreMismatchError, match="different settings"):
        create_store(store, store_attrs("zstd"))
    with pytest.raises(StoreMismatchError):
        create_store(store, store_attrs("none", region_size=32))


def test_create_store_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotATileStoreError, match="not a zarr store"):
        create_store(tmp_path, store_attrs("none"))
    with pytest.raises(NotATileStoreError, match="creation was interrupted"):
        read_store_attrs(tmp_path / "missing")


def test_interrupted_creation_is_finished(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(NotATileStoreError, match="creation was interrupted"):
        read_store_attrs(store)
    created = create_store(store, store_attrs("jpeg"))
    assert read_store_attrs(store) == created and read_table(store).slides == {}


def test_creation_killed_before_the_root_attributes_is_finished(tmp_path, monkeypatch):
    # create_store writes slides/zarr.json and slides.json first and the root zarr.json last:
    # a kill just before the last write must not leave a folder the next run refuses.
    from pipeline import store_writer

    store = tmp_path / "s.zarr"
    real = store_writer._write_json_atomic

    def killed_before_root(path, data):
        if path == store / "zarr.json":
            raise KeyboardInterrupt("killed")
        real(path, data)

    monkeypatch.setattr(store_writer, "_write_json_atomic", killed_before_root)
    with pytest.raises(KeyboardInterrupt):
        create_store(store, store_attrs("none"))
    monkeypatch.undo()
    with pytest.raises(NotATileStoreError, match="creation was interrupted"):
        read_store_attrs(store)
    created = create_store(store, store_attrs("none"))
    assert read_store_attrs(store) == created and read_table(store).slides == {}
    # A folder that only looks similar is still refused.
    other = tmp_path / "other"
    (other / "slides").mkdir(parents=True)
    (other / "slides" / "a.svs").write_bytes(b"x")
    with pytest.raises(NotATileStoreError, match="not a zarr store"):
        create_store(other, store_attrs("none"))


def test_every_file_and_folder_of_a_group_is_fsynced_before_the_commit(tmp_path, monkeypatch):
    import pipeline.store_writer as writer

    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("zstd"))
    synced: set[str] = set()
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    at_commit: dict[str, set[str]] = {}
    real_commit = writer.commit_group

    def recording_commit(root, temp, slide_id):
        group = Path(root) / "slides" / temp
        at_commit["paths"] = {str(group)} | {str(p) for p in group.rglob("*")}
        at_commit["synced"] = set(synced)
        return real_commit(root, temp, slide_id)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(writer, "commit_group", recording_commit)
    write_example_slide(store, "a", smooth_regions(3))
    assert at_commit["paths"] and at_commit["paths"] <= at_commit["synced"]  # arrays, zarr.json, folders


def test_extra_group_files_are_written_and_checked(tmp_path):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("none"))
    n = 2
    coords = np.zeros((n, 2), int)
    write_slide(store, "a", regions=iter(smooth_regions(n)), n_regions=n, coords=coords, origin=coords,
                foreground=np.ones(n), attrs={"source_path": "x", "fingerprint": "f"}, files={"tissue.geojson": b"{}"})
    assert (store / "slides" / "a" / "tissue.geojson").read_bytes() == b"{}"
    with pytest.raises(SlideWriteError, match="cannot be an extra file"):
        write_slide(store, "b", regions=iter(smooth_regions(n)), n_regions=n, coords=coords, origin=coords,
                    foreground=np.ones(n), attrs={"source_path": "x", "fingerprint": "f"}, files={"regions": b""})


@pytest.mark.parametrize(
    "data",
    [
        np.arange(14, dtype=np.int32).reshape(7, 2),
        np.arange(14, dtype=np.int64).reshape(7, 2) * 10**10,
        np.linspace(0.5, 1.0, 7, dtype=np.float32),
        np.zeros((3, 2), np.int32),  # all fill value: zarr writes no chunk
        np.zeros((0, 2), np.int64),  # empty slide
        np.array([-0.0, 0.0], np.float32),
        np.array([np.nan, 0.25], np.float32),
    ],
    ids=["int32", "int64", "float32", "zeros", "empty", "negative-zero", "nan"],
)
def test_small_arrays_are_stored_byte_for_byte_as_zarr_stores_them(tmp_path, data):
    """The writer stores coords/origin/foreground itself (no zarr calls): same files, same bytes."""
    from pipeline.store_writer import _write_small_array

    ours = tmp_path / "ours"
    ours.mkdir()
    _write_small_array(ours / "a", data)
    theirs = tmp_path / "theirs"
    array = zarr.create_array(
        store=zarr.storage.LocalStore(theirs), name="a", shape=data.shape, dtype=data.dtype,
        chunks=(max(data.shape[0], 1), *data.shape[1:]), compressors=None, filters=None, fill_value=0,
    )
    if data.size:
        array[...] = data

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(ours / "a") == files(theirs / "a")  # (zarr also adds a root group)
    np.testing.assert_array_equal(zarr.open_array(zarr.storage.LocalStore(ours), path="a", mode="r")[...], data)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_raw_regions_metadata_is_zarrs(tmp_path, n):
    """Codec `none`: the writer writes the regions' zarr.json itself, byte for byte zarr's."""
    from pipeline.schema.codecs import codec_settings, region_array_kwargs
    from pipeline.store_writer import _zarr_json, raw_regions_metadata

    zarr.create_array(
        store=zarr.storage.LocalStore(tmp_path), name="r",
        **region_array_kwargs(codec_settings("none"), n_regions=n, region_size=REGION),
    )
    assert _zarr_json(raw_regions_metadata(n, REGION)) == (tmp_path / "r" / "zarr.json").read_bytes()
