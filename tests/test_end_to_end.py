"""End to end on the real slide: demo cohort → `pm-tiles build` → `pm-train supervised` → checkpoint.

The one slow test that walks the whole data flow the way `make demo` does (manifest →
pipeline → store → trainer.data → model → objective → engine), on slides made from the
real CMU-1 tissue, through both command-line interfaces.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main as pm_tiles
from pipeline.demo_cohort import make_demo_cohort
from pipeline.schema.reader import open_store
from trainer.cli import main as pm_train

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_cohort_tiles_and_trains_end_to_end(tmp_path, real_slide_path):
    manifest = tmp_path / "demo.csv"
    make_demo_cohort(real_slide_path, tmp_path / "cohort", manifest_path=manifest, n_per_class=4)
    store = tmp_path / "mag5-r32.zarr"

    built = CliRunner().invoke(pm_tiles, [
        "build", "--manifest", str(manifest), "--magnification", "5", "--region-size", "32",
        "--out", str(store), "--workers", "0", "--no-progress",
    ])
    assert built.exit_code == 0, built.output
    tiles = open_store(store)
    assert len(tiles.slides) == 9 and tiles.failures.empty  # the real slide + 2 classes × 4
    assert tiles.attrs.region_size == 32 and tiles.attrs.mpp == 2.0
    real = tiles.read_slide("cmu_small_region")
    assert real.regions.shape[1:] == (32, 32, 3) and len(real.regions) > 100

    run = tmp_path / "run"
    trained = CliRunner().invoke(pm_train, [
        "supervised", "--config", str(REPO_ROOT / "configs" / "demo_cpu.toml"), "--store", str(store),
        "--out", str(run), "--epochs", "2", "--device", "cpu",
    ], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r["phase"] == "train" for r in rows) and any(r["phase"] == "val" for r in rows)
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows if r["loss"])
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["region_size"] == 32 and checkpoint["mpp"] == 2.0
