"""`pm-tiles build --scheduler` on a `distributed` LocalCluster of worker processes, with faults:
a worker killed mid-slide, and the driver killed while its tasks still run on the cluster.

Workers load `slow_worker_preload.py`, which makes each region take a moment to write,
so the kills land while a slide's temporary group is being written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_driver import _assert_each_complete_once, _build, _manifest, _slide

from pipeline.schema.commit import read_table

PRELOAD = str(Path(__file__).with_name("slow_worker_preload.py"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def cluster(monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setenv("SLOW_REGION_SECONDS", "0.15")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=50, preload=[PRELOAD]) as local, Client(local) as client:
        yield local, client


def _rows(folder: Path, n: int) -> list[tuple[str, str]]:
    return [(f"w{i}", str(_slide(folder, f"w{i}", colour=(140 + 20 * i, 70, 160)))) for i in range(n)]


def _wait_for_temp_group(out: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slides = out / "slides"
        if slides.is_dir() and any(p.name.startswith(".tmp-") for p in slides.iterdir()):
            return
        time.sleep(0.01)
    raise AssertionError(f"no slide was being written under {out} within {timeout} s")


def _wait_idle(client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(client.processing().values()):
            return
        time.sleep(0.1)
    raise AssertionError("the cluster kept running tasks")


def test_a_worker_killed_mid_slide_is_retried_or_failed_and_a_rerun_completes(tmp_path, cluster):
    local, client = cluster
    rows = _rows(tmp_path, 3)
    manifest, out = _manifest(tmp_path, rows), tmp_path / "st.zarr"
    outcome = {}
    build = threading.Thread(target=lambda: outcome.update(
        summary=_build(manifest, out, scheduler=local.scheduler_address)))
    build.start()
    _wait_for_temp_group(out)
    pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    build.join(timeout=180)
    assert not build.is_alive()
    summary = outcome["summary"]
    # the lost task was retried on a (restarted) worker, or recorded as failed with a reason
    assert set(summary.written) | {f.slide_id for f in summary.failures} == {"w0", "w1", "w2"}
    assert all(f.reason for f in summary.failures), summary.format()
    table = read_table(out)
    assert set(table.slides) == set(summary.written)
    from pipeline.verify import verify_store

    assert verify_store(out).ok  # the store stayed valid throughout
    rerun = _build(manifest, out, scheduler=local.scheduler_address)
    assert rerun.ok
    _assert_each_complete_once(out, {"w0", "w1", "w2"})  # and no temporary leftovers


def test_a_killed_driver_cannot_commit_half_written_slides_into_the_restarted_build(tmp_path, cluster):
    local, client = cluster
    rows = _rows(tmp_path, 4)
    manifest, out = _manifest(tmp_path, rows), tmp_path / "st.zarr"
    command = [sys.executable, "-m", "pipeline.cli", "build", "--manifest", str(manifest), "--magnification", "10",
               "--out", str(out), "--region-size", "32", "--no-progress", "--scheduler", local.scheduler_address]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    _wait_for_temp_group(out)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL
    # The old tasks may still be writing on the cluster: the restarted build removes their
    # temporary groups, and its build id keeps any of them from committing.
    restarted = _build(manifest, out, scheduler=local.scheduler_address)
    assert restarted.ok, restarted.format()
    _wait_idle(client)
    _assert_each_complete_once(out, {"w0", "w1", "w2", "w3"})
    from pipeline.verify import verify_store

    assert verify_store(out).ok
