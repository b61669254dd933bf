"""`pm-tiles build --reader/--scaled-decode` and the driver's small-build shortcut."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from synthetic import write_stripped_tiff, synthetic_image, write_synthetic_slide

from pipeline.cli import main
from pipeline.driver import build_store
from pipeline.schema.reader import open_store


def _manifest(tmp_path, n: int = 2):
    rows = []
    for i in range(n):
        path = tmp_path / f"c{i}.tif"
        write_synthetic_slide(path, width=512, height=384, mpp=0.5, levels=(1, 2), tissue_rects=[(64, 64, 256, 192)],
                              compression="jpeg")
        rows.append(f"c{i},{path}\n")
    manifest = tmp_path / f"m{n}.csv"
    manifest.write_text("slide_id,path\n" + "".join(rows))
    return manifest


def _build(manifest, out, *extra):
    return CliRunner().invoke(main, ["build", "--manifest", str(manifest), "--magnification", "10", "--out", str(out),
                                     "--workers", "0", "--region-size", "32", "--no-progress", *extra])


@pytest.mark.parametrize("reader", ["auto", "direct", "openslide"])
def test_reader_option_is_recorded_per_slide(tmp_path, reader):
    out = tmp_path / "s.zarr"
    result = _build(_manifest(tmp_path), out, "--reader", reader)
    assert result.exit_code == 0, result.output
    expected = "openslide" if reader == "openslide" else "direct"
    assert list(open_store(out).slides["reader"]) == [expected, expected]


def test_unknown_reader_is_a_usage_error(tmp_path):
    result = _build(_manifest(tmp_path), tmp_path / "s.zarr", "--reader", "bioformats")
    assert result.exit_code == 2 and "bioformats" in result.output


def test_scaled_decode_is_recorded_in_the_store_settings(tmp_path):
    out = tmp_path / "s.zarr"
    manifest = _manifest(tmp_path)
    assert _build(manifest, out, "--scaled-decode").exit_code == 0
    assert open_store(out).attrs.decode == {"dct_scaled": True}
    assert _build(manifest, out).exit_code == 0  # a re-run without flags keeps the store's own settings
    assert open_store(out).attrs.decode == {"dct_scaled": True}
    again = _build(manifest, out, "--exact-decode")  # exact decoding asked for on a DCT-scaled store
    assert again.exit_code == 2 and "decode.dct_scaled" in again.output


def test_a_stripped_tiff_the_openslide_reader_refuses_is_a_failed_slide(tmp_path):
    path = tmp_path / "strips.tif"
    write_stripped_tiff(path, synthetic_image(width=512, height=384, tissue_rects=[(64, 64, 256, 192)]), mpp=0.5)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\nstrips,{path}\n")
    assert _build(manifest, tmp_path / "a.zarr").exit_code == 0
    refused = _build(manifest, tmp_path / "o.zarr", "--reader", "openslide")
    assert refused.exit_code == 1 and "not a slide OpenSlide can read" in refused.output


def test_a_one_slide_build_starts_no_cluster(tmp_path, monkeypatch):
    import distributed

    def no_cluster(*args, **kwargs):
        raise AssertionError("a one-slide build must not start a Dask cluster")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    summary = build_store(_manifest(tmp_path, n=1), tmp_path / "s.zarr", magnification=10.0, region_size=32,
                          workers=2, progress=False)
    assert summary.ok and summary.written == ("c0",)
