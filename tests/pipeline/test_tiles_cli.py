"""`pm-tiles build/info/qc` (pipeline/cli.py): exit codes, output, clean errors.

Not named test_cli.py: tests/trainer/test_cli.py exists and test basenames must be unique.
"""

from __future__ import annotations

from click.testing import CliRunner
from synthetic import write_synthetic_slide
from tile_store_helpers import make_store

from pipeline.cli import main


def _manifest(tmp_path, with_bad: bool = False):
    rows = []
    for i in range(2):
        path = tmp_path / f"c{i}.tif"
        write_synthetic_slide(path, width=512, height=384, mpp=0.5, levels=(1, 2), tissue_rects=[(64, 64, 256, 192)])
        rows.append(f"c{i},{path},L{i}\n")
    if with_bad:
        (tmp_path / "bad.svs").write_bytes(b"\0" * 100)
        rows.append(f"bad,{tmp_path / 'bad.svs'},L0\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,label\n" + "".join(rows))
    return manifest


def _build_args(manifest, out, *extra):
    return ["build", "--manifest", str(manifest), "--magnification", "10", "--out", str(out),
            "--workers", "0", "--region-size", "32", "--no-progress", *extra]


def test_build_info_qc(tmp_path):
    out = tmp_path / "st.zarr"
    runner = CliRunner()
    result = runner.invoke(main, _build_args(_manifest(tmp_path), out, "--codec", "zstd", "--zstd-level", "5"))
    assert result.exit_code == 0, result.output
    assert "2 written (24 regions)" in result.output
    info = runner.invoke(main, ["info", str(out), "--verify"])
    assert info.exit_code == 0, info.output
    for text in ("pixel-mamba-tile-store 1.1", "10× (1 µm/px)", "codec          zstd (level 5)",
                 "2 complete, 0 failed; 24 regions", "L0: 1, L1: 1", "size on disk", "checksums match"):
        assert text in info.output
    qc = runner.invoke(main, ["qc", str(out), "--out", str(tmp_path / "qc")])
    assert qc.exit_code == 0 and "wrote 2 QC picture(s)" in qc.output
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["c0.png", "c1.png"]


def test_failed_slide_gives_exit_code_1_and_is_listed(tmp_path):
    out = tmp_path / "st.zarr"
    runner = CliRunner()
    result = runner.invoke(main, _build_args(_manifest(tmp_path, with_bad=True), out))
    assert result.exit_code == 1
    assert "1 failed" in result.output and "FAILED bad" in result.output
    info = runner.invoke(main, ["info", str(out)])
    assert "2 complete, 1 failed" in info.output and "FAILED         bad" in info.output


def test_errors_print_cleanly(tmp_path):
    runner = CliRunner()
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\nbad id!,missing.svs\n")
    result = runner.invoke(main, _build_args(manifest, tmp_path / "st.zarr"))
    assert result.exit_code == 2 and "Error: manifest" in result.output and "line 2" in result.output
    assert "Traceback" not in result.output
    info = runner.invoke(main, ["info", str(tmp_path)])
    assert info.exit_code == 2 and "not a tile store" in info.output
    option = runner.invoke(main, _build_args(manifest, tmp_path / "st.zarr", "--jpeg-quality", "80"))
    assert option.exit_code == 2 and "--jpeg-quality needs --codec jpeg" in option.output
    store = make_store(tmp_path / "other.zarr", "jpeg")
    mismatch = runner.invoke(main, _build_args(_manifest(tmp_path), store))
    assert mismatch.exit_code == 2 and "different settings" in mismatch.output
