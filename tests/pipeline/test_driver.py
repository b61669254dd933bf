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

    def load_then_lose_a_file(path):
        loaded = real_load(path)
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


def test_a_second_build_on_the_same_store_is_refused(tmp_path, slides):
    import fcntl

    from pipeline.schema.errors import TileStoreError

    manifest, out = _manifest(tmp_path, slides[:1]), tmp_path / "st.zarr"
    _build(manifest, out)
    with open(out / driver.LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running build holds it
        with pytest.raises(TileStoreError, match="another `pm-tiles build` is writing"):
            _build(manifest, out)
    assert _build(manifest, out).skipped == ("s0",)
