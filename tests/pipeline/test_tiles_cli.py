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


def test_info_counts_per_split_and_label_and_rerun_without_options(tmp_path):
    rows = []
    for i, (label, split) in enumerate([("L0", "train"), ("L1", "train"), ("L1", "test")]):
        path = tmp_path / f"c{i}.tif"
        write_synthetic_slide(path, width=512, height=384, mpp=0.5, levels=(1, 2), tissue_rects=[(64, 64, 256, 192)])
        rows.append(f"c{i},{path},{label},{split},p{i}\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,label,split,case_id\n" + "".join(rows))
    out = tmp_path / "st.zarr"
    runner = CliRunner()
    assert runner.invoke(main, _build_args(manifest, out)).exit_code == 0
    info = runner.invoke(main, ["info", str(out)])
    assert "splits         test: 1, train: 2" in info.output
    table = info.output.split("per split and label:\n")[1].splitlines()
    assert table[1].split() == ["test", "0", "1", "1"] and table[2].split() == ["train", "1", "1", "2"]
    assert table[3].split() == ["all", "1", "2", "3"]
    rerun = runner.invoke(main, ["build", "--manifest", str(manifest), "--out", str(out), "--workers", "0", "--no-progress"])
    assert rerun.exit_code == 0 and "3 already complete" in rerun.output
    other = runner.invoke(main, ["build", "--manifest", str(manifest), "--out", str(out), "--workers", "0",
                                 "--no-progress", "--region-size", "64"])
    assert other.exit_code == 2 and "region_size: 32 → 64" in other.output and "segmentation" not in other.output


def test_mpp_and_40x_targets(tmp_path):
    manifest = _manifest(tmp_path)
    runner = CliRunner()
    args = ["build", "--manifest", str(manifest), "--workers", "0", "--region-size", "32", "--no-progress"]
    forty = runner.invoke(main, [*args, "--out", str(tmp_path / "a.zarr"), "--magnification", "40"])
    assert forty.exit_code == 1 and "UpsamplingError" not in forty.output and "finer than the slide's level 0" in forty.output
    allowed = runner.invoke(main, [*args, "--out", str(tmp_path / "b.zarr"), "--magnification", "40", "--allow-upsampling"])
    assert allowed.exit_code == 0, allowed.output
    mpp = runner.invoke(main, [*args, "--out", str(tmp_path / "c.zarr"), "--mpp", "0.75"])
    assert mpp.exit_code == 0 and "13.3× (0.75 µm/px)" in runner.invoke(main, ["info", str(tmp_path / "c.zarr")]).output
    both = runner.invoke(main, [*args, "--out", str(tmp_path / "d.zarr"), "--mpp", "1", "--magnification", "10"])
    assert both.exit_code == 2 and "not both" in both.output
    neither = runner.invoke(main, [*args, "--out", str(tmp_path / "e.zarr")])
    assert neither.exit_code == 2 and "does not exist yet" in neither.output


def test_repair_redoes_exactly_the_corrupt_slides(tmp_path):
    manifest, out = _manifest(tmp_path), tmp_path / "st.zarr"
    runner = CliRunner()
    assert runner.invoke(main, _build_args(manifest, out)).exit_code == 0
    chunk = out / "slides" / "c1" / "regions" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert runner.invoke(main, ["verify", str(out), "--no-progress"]).exit_code == 1
    plain = runner.invoke(main, _build_args(manifest, out))
    assert "2 already complete" in plain.output  # a plain re-run trusts the table
    repaired = runner.invoke(main, _build_args(manifest, out, "--repair"))
    assert repaired.exit_code == 0 and "1 written" in repaired.output and "repaired (corrupt or missing, redone): c1" in repaired.output
    assert runner.invoke(main, ["verify", str(out), "--no-progress"]).exit_code == 0
