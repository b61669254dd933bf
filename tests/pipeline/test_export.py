"""`pm-tiles export-coords`: CLAM/TRIDENT-style coordinates from a built store."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
from click.testing import CliRunner
from synthetic import write_synthetic_slide

from pipeline.cli import main
from pipeline.driver import build_store
from pipeline.schema.reader import open_store


def _store(tmp_path):
    path = tmp_path / "s.tif"
    # 0.5 µm/px with levels 1, 4: 5× (2 µm/px) reads level 1 exactly; R = 32 → 128 level-0 px per region
    write_synthetic_slide(path, width=1024, height=768, mpp=0.5, levels=(1, 4), tissue_rects=[(128, 128, 512, 384)])
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\ns,{path}\n")
    out = tmp_path / "st.zarr"
    assert build_store(manifest, out, magnification=5, region_size=32, workers=0, progress=False).ok
    return out


def test_h5_and_csv_coordinates(tmp_path):
    store = _store(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["export-coords", str(store), "--out", str(tmp_path / "h5")])
    assert result.exit_code == 0, result.output
    origin = open_store(store).read_slide("s").origin
    with h5py.File(tmp_path / "h5" / "s.h5") as handle:
        coords = handle["coords"]
        np.testing.assert_array_equal(coords[...], origin)
        assert coords.dtype == np.int64 and coords.shape == (12, 2)
        assert coords.attrs["patch_level"] == 1 and coords.attrs["patch_size"] == 32
        assert coords.attrs["patch_size_level0"] == 128 and coords.attrs["level0_magnification"] == 20
        assert coords.attrs["target_magnification"] == 5 and coords.attrs["name"] == "s"
    assert origin[0].tolist() == [128, 128]  # level-0 (x, y) of the first region
    result = runner.invoke(main, ["export-coords", str(store), "--out", str(tmp_path / "csv"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "csv" / "coords.csv")
    assert list(table.columns[:3]) == ["slide_id", "x", "y"] and len(table) == 12
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), origin)
    assert (table["patch_size_level0"] == 128).all()
