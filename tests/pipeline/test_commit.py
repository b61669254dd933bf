"""Commit protocol: rename into place, atomic table rewrite, reconcile after crashes."""

from __future__ import annotations

import json
import os

import pytest
from tile_store_helpers import make_store, smooth_regions, store_attrs, write_example_slide

from pipeline.schema import commit
from pipeline.schema.errors import TileStoreError
from pipeline.schema.format import FailureRecord
from pipeline.store_writer import create_store


def test_crash_between_rename_and_table_update_is_reconciled(tmp_path):
    store = tmp_path / "s.zarr"
    create_store(store, store_attrs("none"))
    result = write_example_slide(store, "a", smooth_regions(3))  # committed, table never updated
    assert commit.read_table(store).slides == {}
    table, report = commit.reconcile(store)
    assert report.added == ("a",) and report.changed
    record = table.slides["a"]
    assert record.checksum == result["checksum"] and record.n_regions == 3
    assert record.label == "A" and record.case_id == "c1" and record.extra == {"site": "x"}
    assert record.grid_shape == (1, 4) and record.source_path == "/data/a.svs"
    assert commit.read_table(store).slides["a"] == record  # persisted
    assert not commit.reconcile(store)[1].changed  # idempotent


def test_temp_leftovers_removed_and_missing_groups_dropped(tmp_path):
    store = make_store(tmp_path / "s.zarr", slides={"a": 2, "b": 2})
    leftover = store / "slides" / commit.temp_group_name("c")
    (leftover / "regions").mkdir(parents=True)
    (leftover / "regions" / "junk").write_bytes(b"partial")
    import shutil

    shutil.rmtree(store / "slides" / "b")
    table, report = commit.reconcile(store)
    assert report.removed_temps == (leftover.name,) and not leftover.exists()
    assert report.dropped == ("b",) and set(table.slides) == {"a"}
    assert set(commit.read_table(store).slides) == {"a"}


def test_a_redone_slide_is_refreshed(tmp_path):
    store = make_store(tmp_path / "s.zarr", slides={"a": 2})
    new = write_example_slide(store, "a", smooth_regions(4, seed=9))
    table, report = commit.reconcile(store)
    assert report.refreshed == ("a",) and table.slides["a"].checksum == new["checksum"]
    assert table.slides["a"].n_regions == 4


def test_table_rewrite_is_atomic(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr", slides={"a": 2})
    before = (store / "slides.json").read_bytes()
    table = commit.read_table(store).with_failure(
        FailureRecord(slide_id="z", source_path="/z", reason="boom", error_type="X")
    )

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(commit.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        commit.write_table(store, table)
    assert (store / "slides.json").read_bytes() == before  # old table intact
    assert sorted(p.name for p in store.iterdir()) == ["slides", "slides.json", "zarr.json"]  # no aside file
    monkeypatch.undo()
    commit.write_table(store, table)
    assert set(commit.read_table(store).failures) == {"z"}


def test_table_transitions():
    from pipeline.schema.format import SlideRecord

    rec = SlideRecord(slide_id="a", n_regions=1, label=None, split=None, case_id=None, source_path="p",
                      fingerprint="f", checksum="c", mpp_source="slide", grid_shape=(1, 1))
    fail = FailureRecord(slide_id="a", source_path="p", reason="r", error_type="E")
    table = commit.SlideTable().with_failure(fail)
    assert set(table.failures) == {"a"} and not table.slides
    table = table.with_slide(rec)
    assert set(table.slides) == {"a"} and not table.failures
    parsed = commit.parse_table(json.dumps(table.to_json()))
    assert parsed == table
    with pytest.raises(TileStoreError, match="not a valid slide table"):
        commit.parse_table(b"{}")


def _group_pair(tmp_path):
    """slides/a (holding `old`) and a temporary group for `a` (holding `new`)."""
    slides = tmp_path / "slides"
    (slides / "a").mkdir(parents=True)
    (slides / "a" / "old").write_text("old")
    temp = commit.temp_group_name("a")
    (slides / temp).mkdir()
    (slides / temp / "new").write_text("new")
    return slides, temp


def test_commit_replaces_existing_group_without_leftovers(tmp_path):
    slides, temp = _group_pair(tmp_path)
    commit.commit_group(tmp_path, temp, "a")
    assert os.listdir(slides) == ["a"] and os.listdir(slides / "a") == ["new"]


def test_replacing_a_group_never_leaves_the_slide_missing(tmp_path, monkeypatch):
    # A kill at any step of replacing slides/a (a redone slide) must leave slides/a complete:
    # the table still lists it, and readers trust the table.
    slides, temp = _group_pair(tmp_path)
    real_rename, calls = os.rename, []

    def killed_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    def killed_before_cleanup(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(commit.os, "rename", killed_on_second_rename)
    monkeypatch.setattr(commit.shutil, "rmtree", killed_before_cleanup)
    with pytest.raises(KeyboardInterrupt):
        commit.commit_group(tmp_path, temp, "a")
    monkeypatch.undo()
    assert os.listdir(slides / "a") == ["new"]
    leftovers = [name for name in os.listdir(slides) if name != "a"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-a-")
    assert os.listdir(slides / leftovers[0]) == ["old"]


def test_commit_without_atomic_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    slides, temp = _group_pair(tmp_path)
    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    commit.commit_group(tmp_path, temp, "a")
    assert os.listdir(slides) == ["a"] and os.listdir(slides / "a") == ["new"]


def test_reconcile_removes_table_leftovers_and_never_adds_an_incomplete_group(tmp_path):
    store = make_store(tmp_path / "s.zarr", slides={"a": 2, "b": 2})
    leftover = store / "slides.json.tmp-0123abcd"
    leftover.write_text('{"slides": [')  # a table write interrupted before its rename
    (store / "slides" / "b" / "regions" / "c" / "0" / "0" / "0" / "0").unlink()  # regions data lost
    write_example_slide(store, "c", smooth_regions(3))
    chunk = store / "slides" / "c" / "regions" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # an empty/short file after a power loss
    table, report = commit.reconcile(store)
    assert leftover.name in report.removed_temps and not leftover.exists()
    assert set(table.slides) == {"a"} and report.dropped == ("b",) and report.added == ()
    assert commit.group_problem(store / "slides" / "c") == "array 'regions' holds 100 bytes, expected 2304"
    assert commit.group_problem(store / "slides" / "a") is None
