"""`pm-tiles stage`: a verified, resumable local copy of a store, optionally transcoded."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from tile_store_helpers import make_store, smooth_regions

from pipeline.cli import main
from pipeline.schema.commit import read_table
from pipeline.schema.reader import open_store
from pipeline.stage import stage_store
from pipeline.verify import verify_store


def test_stage_copies_verifies_and_resumes(tmp_path):
    source = make_store(tmp_path / "src.zarr", "zstd", slides={"a": 3, "b": 4})
    local = tmp_path / "local.zarr"
    first = stage_store(source, local)
    assert first.ok and first.copied == ("a", "b") and first.bytes_read > 0
    assert verify_store(local).ok
    staged = open_store(local)
    assert staged.attrs.codec == open_store(source).attrs.codec
    assert read_table(local).slides["a"].checksum == read_table(source).slides["a"].checksum
    again = stage_store(source, local)
    assert again.copied == () and again.skipped == ("a", "b") and again.bytes_read == 0


def test_stage_transcodes_to_memory_mapped_raw(tmp_path):
    source = make_store(tmp_path / "src.zarr", "zstd", slides={"a": 3})
    result = CliRunner().invoke(main, ["stage", str(source), str(tmp_path / "raw.zarr"), "--codec", "none", "--no-progress"])
    assert result.exit_code == 0, result.output
    raw = open_store(tmp_path / "raw.zarr")
    regions = raw.read_slide("a").regions
    assert isinstance(regions, np.memmap) and raw.attrs.codec["name"] == "none"
    np.testing.assert_array_equal(regions, smooth_regions(3, seed=0))  # zstd is lossless
    np.testing.assert_array_equal(raw.read_slide("a").origin, open_store(source).read_slide("a").origin)
    assert raw.slide_attrs("a")["staged_from"]["checksum"] == open_store(source).records["a"].checksum
    assert verify_store(tmp_path / "raw.zarr").ok
    assert "1 already staged" in CliRunner().invoke(
        main, ["stage", str(source), str(tmp_path / "raw.zarr"), "--codec", "none", "--no-progress"]).output


def test_a_corrupt_source_slide_is_not_staged_and_is_reported(tmp_path):
    source = make_store(tmp_path / "src.zarr", "none", slides={"a": 2, "b": 2})
    chunk = source / "slides" / "a" / "regions" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 1
    chunk.write_bytes(bytes(data))
    summary = stage_store(source, tmp_path / "local.zarr")
    assert not summary.ok and set(summary.failed) == {"a"} and summary.copied == ("b",)
    assert sorted(p.name for p in (tmp_path / "local.zarr" / "slides").iterdir()) == ["b", "zarr.json"]
    result = CliRunner().invoke(main, ["stage", str(source), str(tmp_path / "local2.zarr"), "--no-progress"])
    assert result.exit_code == 1 and "FAILED a: ChecksumError" in result.output
