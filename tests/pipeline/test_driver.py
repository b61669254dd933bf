"""The Dask driver on small synthetic pyramidal TIFFs: build, resume, kill -9, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_synthetic_slide

from pipeline import driver
from pipeline.manifest import ManifestError
from pipeline.schema.commit import read_table
from pipeline.schema.errors import StoreMismatchError
from pipeline.schema.reader import open_store

# 512×384 px at 0.5 µm/px, built at 10× (1 µm/px) with R = 32: step 64 level-0 px, an 8×6 grid.
WIDTH, HEIGHT, RECT = 512, 384, (64, 64, 256, 192)  # tissue covers grid cells cols 1..4, rows 1..3
EXPECTED_REGIONS = 12


def _slide(folder: Path, name: str, **kwargs) -> Path:
    path = folder / f"{name}.tif"
    options = dict(width=WIDTH, height=HEIGHT, mpp=0.5, levels=(1, 2), tissue_rects=[RECT])
    write_synthetic_slide(path, **{**options, **kwargs})
    return path


def _manifest(folder: Path, rows: list[tuple[str, str]], name: str = "m.csv") -> Path:
    path = folder / name
    path.write_text("slide_id,path,label\n" + "".join(f"{sid},{p},{'A' if i % 2 else 'B'}\n" for i, (sid, p) in enumerate(rows)))
    return path


def _build(manifest: Path, out: Path, **kwargs):
    options = dict(magnification=10, region_size=32, workers=0, progress=False)
    return driver.build_store(manifest, out, **{**options, **kwargs})


def _assert_each_complete_once(out: Path, ids: set[str]) -> None:
    table = read_table(out)
    assert set(table.slides) == ids
    groups = sorted(p.name for p in (out / "slides").iterdir() if p.is_dir())
    assert groups == sorted(ids)  # no temp leftovers, no extra groups
    store = open_store(out)
    for slide_id in ids:
        store.verify_slide(slide_id)


@pytest.fixture
def slides(tmp_path) -> list[tuple[str, str]]:
    return [(f"s{i}", str(_slide(tmp_path, f"s{i}", colour=(150 + 20 * i, 70, 160)))) for i in range(3)]


def test_build_then_resume_skips_complete_slides(tmp_path, slides):
    manifest, out = _manifest(tmp_path, slides), tmp_path / "st.zarr"
    first = _build(manifest, out)
    assert first.ok and set(first.written) == {"s0", "s1", "s2"} and first.n_regions == 3 * EXPECTED_REGIONS
    _assert_each_complete_once(out, {"s0", "s1", "s2"})
    store = open_store(out)
    slide = store.read_slide("s1")
    assert slide.regions.shape == (EXPECTED_REGIONS, 32, 32, 3)
    assert slide.coords[:4].tolist() == [[1, 1], [1, 2], [1, 3], [1, 4]]  # row-major
    assert store.slides.set_index("slide_id").loc["s1", "label"] == "A"
    checksums = {k: v.checksum for k, v in read_table(out).slides.items()}

    relabelled = _manifest(tmp_path, slides, "relabelled.csv")
    relabelled.write_text(relabelled.read_text().replace(",A\n", ",C\n"))
    again = _build(relabelled, out)
    assert again.ok and again.written == () and set(again.skipped) == {"s0", "s1", "s2"}
    assert read_table(out).slides["s1"].label == "C"  # label edits need no re-tiling

    _slide(tmp_path, "s2", colour=(90, 160, 90))  # content changed: fingerprint differs
    third = _build(manifest, out)
    assert third.written == ("s2",) and set(third.skipped) == {"s0", "s1"}
    table = read_table(out)
    assert table.slides["s0"].checksum == checksums["s0"] and table.slides["s2"].checksum != checksums["s2"]
    _assert_each_complete_once(out, {"s0", "s1", "s2"})


def test_complete_slide_is_kept_when_its_source_cannot_be_opened_on_rerun(tmp_path, slides):
    manifest, out = _manifest(tmp_path, slides), tmp_path / "st.zarr"
    assert _build(manifest, out).ok
    before = read_table(out).slides["s1"]
    Path(slides[1][1]).write_bytes(b"being copied")  # unreadable now: redoing it would fail
    again = _build(manifest, out)
    assert again.ok and set(again.skipped) == {"s0", "s1", "s2"}
    assert read_table(out).slides["s1"] == before
    _assert_each_complete_once(out, {"s0", "s1", "s2"})


def test_relative_store_path_is_made_absolute(tmp_path, slides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = _build(_manifest(tmp_path, slides), Path("rel.zarr"))
    assert summary.ok and Path(summary.store_path).is_absolute()
    assert summary.store_path == str(tmp_path / "rel.zarr")


def test_failures_are_recorded_with_specific_reasons(tmp_path, slides, monkeypatch):
    (tmp_path / "notes.tif").write_text("this is not a slide")
    good = Path(slides[0][1]).read_bytes()
    (tmp_path / "cut.tif").write_bytes(good[: len(good) // 3])
    gone = _slide(tmp_path, "gone")
    rows = [*slides, ("notes", str(tmp_path / "notes.tif")), ("cut", str(tmp_path / "cut.tif")), ("gone", str(gone))]
    manifest, out = _manifest(tmp_path, rows), tmp_path / "st.zarr"

    real_load = driver.load_manifest

    def load_then_lose_a_file(path, **options):
        loaded = real_load(path, **options)
        gone.unlink()  # missing at run time, after validation
        return loaded

    monkeypatch.setattr(driver, "load_manifest", load_then_lose_a_file)
    summary = _build(manifest, out)
    assert not summary.ok and set(summary.written) == {"s0", "s1", "s2"}
    reasons = {f.slide_id: f.reason for f in summary.failures}
    assert set(reasons) == {"notes", "cut", "gone"}
    assert "not found" in reasons["gone"]
    assert "not a slide" in reasons["notes"]
    assert "truncated" in reasons["cut"]
    assert {f.slide_id: f.error_type for f in summary.failures} == {
        "notes": "NotASlideError", "cut": "UnreadableSlideError", "gone": "SlideNotFoundError",
    }
    table = read_table(out)
    assert set(table.failures) == {"notes", "cut", "gone"} and set(table.slides) == {"s0", "s1", "s2"}
    assert "FAILED gone" in summary.format()

    monkeypatch.setattr(driver, "load_manifest", real_load)
    _slide(tmp_path, "gone")  # the file comes back: the re-run completes it and clears its failure
    fixed = _build(_manifest(tmp_path, [*slides, ("gone", str(gone))], "m2.csv"), out)
    assert fixed.ok and fixed.written == ("gone",)
    table = read_table(out)
    assert "gone" in table.slides and set(table.failures) == {"notes", "cut"}


def test_bad_manifest_fails_before_any_work(tmp_path):
    manifest = _manifest(tmp_path, [("a", str(tmp_path / "nope.tif")), ("bad id", str(tmp_path / "x.tif"))])
    with pytest.raises(ManifestError) as caught:
        _build(manifest, tmp_path / "st.zarr")
    assert len(caught.value.problems) >= 2
    assert not (tmp_path / "st.zarr").exists()


def test_store_with_other_settings_is_refused(tmp_path, slides):
    manifest, out = _manifest(tmp_path, slides[:1]), tmp_path / "st.zarr"
    _build(manifest, out)
    with pytest.raises(StoreMismatchError):
        _build(manifest, out, magnification=5)


@pytest.mark.timeout(120)
def test_local_dask_cluster_builds_a_jpeg_store(tmp_path, slides):
    manifest, out = _manifest(tmp_path, slides), tmp_path / "st.zarr"
    summary = _build(manifest, out, workers=1, codec="jpeg")
    assert summary.ok and set(summary.written) == {"s0", "s1", "s2"}
    store = open_store(out)
    assert store.attrs.codec["name"] == "jpeg"
    local = open_store(_build_in_process_copy(tmp_path, manifest))
    jpeg = np.asarray(store.read_slide("s0").regions[:], dtype=float)
    raw = np.asarray(local.read_slide("s0").regions, dtype=float)
    # JPEG smooths the synthetic stripe texture but keeps colour and structure
    assert np.abs(jpeg.mean(axis=(1, 2)) - raw.mean(axis=(1, 2))).max() < 2
    assert np.abs(jpeg - raw).mean() < 10


def _build_in_process_copy(tmp_path: Path, manifest: Path) -> Path:
    out = tmp_path / "raw.zarr"
    _build(manifest, out, codec="none")
    return out


@pytest.mark.timeout(180)
def test_kill_9_then_rerun_completes_every_slide_exactly_once(tmp_path):
    rows = []
    for i in range(6):
        path = tmp_path / f"k{i}.tif"
        write_synthetic_slide(path, width=1536, height=1536, mpp=0.5, levels=(1, 4),
                              tissue_rects=[(64, 64, 1400, 1400)], textured=False)
        rows.append((f"k{i}", str(path)))
    manifest, out = _manifest(tmp_path, rows), tmp_path / "st.zarr"
    command = [sys.executable, "-m", "pipeline.cli", "build", "--manifest", str(manifest), "--magnification", "20",
               "--out", str(out), "--workers", "0", "--region-size", "32", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        slides_dir = out / "slides"
        if slides_dir.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in slides_dir.iterdir()):
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()
    assert len(read_table(out).slides) < 6  # the run really was interrupted

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    _assert_each_complete_once(out, {f"k{i}" for i in range(6)})


@pytest.mark.timeout(120)
def test_existing_scheduler_address(tmp_path, slides):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        summary = _build(_manifest(tmp_path, slides[:2]), tmp_path / "st.zarr", scheduler=cluster.scheduler_address)
    assert summary.ok and set(summary.written) == {"s0", "s1"}
    _assert_each_complete_once(tmp_path / "st.zarr", {"s0", "s1"})


def test_a_second_build_on_the_same_store_is_refused_naming_the_first(tmp_path, slides):
    import socket

    from pipeline.locking import StoreLockedError, build_lock

    manifest, out = _manifest(tmp_path, slides[:1]), tmp_path / "st.zarr"
    _build(manifest, out)
    with build_lock(out) as first:  # as a running build holds it
        with pytest.raises(StoreLockedError) as caught:
            _build(manifest, out)
    message = str(caught.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started {first.started}" in message
    assert _build(manifest, out).skipped == ("s0",)


def test_store_is_created_only_once_the_lock_is_held(tmp_path, slides):
    from pipeline.locking import StoreLockedError, build_lock

    out = tmp_path / "new.zarr"
    out.mkdir()
    with build_lock(out):
        with pytest.raises(StoreLockedError):
            _build(_manifest(tmp_path, slides[:1]), out)
    assert sorted(p.name for p in out.iterdir()) == [".build.lock"]  # nothing created under another's lock


def test_changed_manifest_mpp_or_tissue_geojson_retiles_the_slide(tmp_path, slides):
    import json as _json

    geojson = tmp_path / "t.geojson"
    square = [[[64, 64], [320, 64], [320, 256], [64, 256], [64, 64]]]
    geojson.write_text(_json.dumps({"type": "Polygon", "coordinates": square}))
    manifest, out = tmp_path / "m.csv", tmp_path / "st.zarr"
    manifest.write_text(f"slide_id,path,mpp,tissue_geojson\ns0,{slides[0][1]},0.5,{geojson}\ns1,{slides[1][1]},,\n")
    first = _build(manifest, out)
    assert set(first.written) == {"s0", "s1"}
    assert read_table(out).slides["s0"].manifest_mpp == 0.5
    assert _build(manifest, out).written == ()  # unchanged: skipped
    geojson.write_text(_json.dumps({"type": "Polygon", "coordinates": [[[64, 64], [192, 64], [192, 192], [64, 192], [64, 64]]]}))
    second = _build(manifest, out)
    assert second.written == ("s0",)  # the tissue polygons changed: same source, new regions
    assert open_store(out).read_slide("s0").regions.shape[0] == 4
    manifest.write_text(manifest.read_text().replace(",0.5,", ",0.4,"))
    third = _build(manifest, out)
    assert third.written == ("s0",)  # the mpp override changed: a different grid
    assert read_table(out).slides["s0"].manifest_mpp == 0.4


def test_slides_not_in_the_manifest_are_named_and_pruned(tmp_path, slides):
    out = tmp_path / "st.zarr"
    _build(_manifest(tmp_path, slides), out)
    smaller = _manifest(tmp_path, slides[:1], "small.csv")
    kept = _build(smaller, out)
    assert kept.stale == ("s1", "s2") and "2 slide(s) in the store are not in the manifest: s1, s2" in kept.format()
    assert set(read_table(out).slides) == {"s0", "s1", "s2"}
    pruned = _build(smaller, out, prune=True)
    assert pruned.pruned == ("s1", "s2") and pruned.stale == ()
    _assert_each_complete_once(out, {"s0"})


def test_target_finer_than_level_0_is_refused_unless_allowed(tmp_path, slides):
    manifest = _manifest(tmp_path, slides[:1])
    refused = _build(manifest, tmp_path / "a.zarr", magnification=40)  # a 20× scan (0.5 µm/px) into a 40× store
    assert not refused.ok and refused.failures[0].error_type == "UpsamplingError"
    assert "finer than the slide's level 0 (0.5 µm/px" in refused.failures[0].reason
    assert "--allow-upsampling" in refused.failures[0].reason
    allowed = _build(manifest, tmp_path / "b.zarr", magnification=40, allow_upsampling=True)
    assert allowed.ok and read_table(tmp_path / "b.zarr").slides["s0"].upsampled
    assert not read_table(_build(manifest, tmp_path / "c.zarr").store_path).slides["s0"].upsampled


def test_any_target_mpp(tmp_path, slides):
    summary = _build(_manifest(tmp_path, slides[:1]), tmp_path / "st.zarr", magnification=None, mpp=0.75)
    store = open_store(tmp_path / "st.zarr")
    assert summary.ok and store.attrs.mpp == 0.75 and store.attrs.magnification == pytest.approx(10 / 0.75)
    assert store.slide_attrs("s0")["step"] == pytest.approx(32 * 0.75 / 0.5)


def test_settings_mismatch_names_only_what_differs_and_a_rerun_reuses_the_store(tmp_path, slides):
    manifest, out = _manifest(tmp_path, slides[:1]), tmp_path / "st.zarr"
    _build(manifest, out, codec="zstd")
    with pytest.raises(StoreMismatchError) as caught:
        _build(manifest, out, magnification=5, codec="zstd")
    message = str(caught.value)
    assert "magnification: 10.0 → 5.0" in message and "mpp: 1.0 → 2.0" in message
    assert "segmentation" not in message and "codec" not in message and len(message) < 400
    again = driver.build_store(manifest, out, workers=0, progress=False)  # no settings: the store's own
    assert again.ok and again.skipped == ("s0",)
    with pytest.raises(ValueError, match="does not exist yet"):
        driver.build_store(manifest, tmp_path / "new.zarr", workers=0, progress=False)


def test_skip_missing_records_absent_files_and_tiles_the_rest(tmp_path, slides):
    rows = [*slides[:2], ("gone", str(tmp_path / "gone.svs"))]
    manifest, out = _manifest(tmp_path, rows), tmp_path / "st.zarr"
    with pytest.raises(ManifestError, match="--skip-missing"):
        _build(manifest, out)
    summary = _build(manifest, out, skip_missing=True)
    assert set(summary.written) == {"s0", "s1"} and [f.slide_id for f in summary.failures] == ["gone"]
    assert "gone" in read_table(out).failures
    status = (out / "build_status.csv").read_text().splitlines()
    assert status[0] == "slide_id,state,n_regions,seconds,reason"
    assert any(line.startswith("gone,missing,0,") for line in status)
    assert any(line.startswith(f"s0,written,{EXPECTED_REGIONS},") for line in status)
    rerun = _build(manifest, out, skip_missing=True)
    assert set(rerun.skipped) == {"s0", "s1"}
    assert any(line.startswith(f"s1,skipped,{EXPECTED_REGIONS},") for line in (out / "build_status.csv").read_text().splitlines())


def test_slide_group_has_a_qupath_geojson_simplified_polygons_and_the_pipeline_version(tmp_path, slides):
    import json as _json

    import pipeline
    from pipeline.slide import open_slide
    from pipeline.tissue import TissueSettings, mask_to_polygons, tissue_mask

    out = tmp_path / "st.zarr"
    _build(_manifest(tmp_path, slides[:1]), out)
    attrs = open_store(out).slide_attrs("s0")
    assert attrs["pipeline_version"] == pipeline.__version__
    on_disk = _json.loads((out / "slides" / "s0" / "tissue.geojson").read_text())
    assert on_disk == attrs["tissue_geojson"] and on_disk["type"] == "FeatureCollection"
    assert on_disk["features"][0]["properties"]["objectType"] == "annotation"
    slide = open_slide(slides[0][1])
    mask = tissue_mask(slide, 0.5, TissueSettings())
    traced = mask_to_polygons(mask.mask, mask.downsample)
    stored = sum(len(f["geometry"]["coordinates"][0]) for f in on_disk["features"])
    assert stored < sum(len(p.exterior.coords) for p in traced.geoms)  # simplified
    assert stored <= 12  # a rectangle with chamfered corners, not one vertex per mask pixel


def test_table_is_written_in_batches_not_per_slide(tmp_path, slides, monkeypatch):
    from pipeline import table_batch

    writes = []
    real = table_batch.write_table
    monkeypatch.setattr(table_batch, "write_table", lambda path, table: (writes.append(len(table.slides)), real(path, table)))
    out = tmp_path / "st.zarr"
    summary = _build(_manifest(tmp_path, slides), out, table_batch=driver.TableBatch(every=2, seconds=1e9))
    assert summary.ok and writes == [2, 3]  # after two slides, then at the end
    _assert_each_complete_once(out, {"s0", "s1", "s2"})


def test_a_failed_redo_leaves_no_old_group_and_reconcile_does_not_bring_it_back(tmp_path, slides):
    from pipeline.schema.commit import reconcile

    manifest, out = _manifest(tmp_path, slides[:1]), tmp_path / "st.zarr"
    _build(manifest, out)
    _slide(tmp_path, "s0", tissue_rects=[])  # opens with another fingerprint: redone, and has no tissue
    redo = _build(manifest, out)
    assert [f.slide_id for f in redo.failures] == ["s0"]
    assert sorted(p.name for p in (out / "slides").iterdir()) == ["zarr.json"]
    table, report = reconcile(out)
    assert "s0" not in table.slides and "s0" in table.failures and report.added == ()
