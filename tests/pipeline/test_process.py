"""One slide end to end into a store; every failure becomes a specific FailureRecord."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import box
from synthetic import block_mean, write_synthetic_slide

from pipeline.manifest import ManifestRow
from pipeline.process import ProcessSettings, process_slide
from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import read_table, write_table
from pipeline.schema.format import StoreAttrs
from pipeline.schema.reader import open_store
from pipeline.store_writer import create_store
from pipeline.tissue import TissueSettings, tissue_to_geojson

R = 224


def _store(tmp_path, target_mpp=2.0, codec="none"):
    path = tmp_path / "store.zarr"
    create_store(
        path,
        StoreAttrs(
            magnification={4.0: 2.5, 2.0: 5.0, 1.0: 10.0}[target_mpp], mpp=target_mpp, region_size=R,
            min_foreground=0.5, codec=codec_settings(codec), segmentation=TissueSettings().to_json(),
            pipeline_version="0.1.0",
        ),
    )
    return str(path)


def _publish(store, result):
    """What the driver does after a task: put the record in the slide table."""
    write_table(store, read_table(store).with_slide(result.record))
    return open_store(store).read_slide(result.slide_id)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """0.5 µm/px, 2688×1792 level 0, levels 1/2/4; tissue exactly on 5× cells (0,0),(0,1),(1,2)."""
    path = tmp_path_factory.mktemp("proc") / "slide.tif"
    rects = [(0, 0, 1792, 896), (1792, 896, 896, 896)]
    image = write_synthetic_slide(path, width=2688, height=1792, mpp=0.5, tissue_rects=rects)
    return path, image


def test_slide_end_to_end_exact_regions_and_record(tmp_path, slide):
    path, image = slide
    store = _store(tmp_path)
    row = ManifestRow(slide_id="s1", path=str(path), label="a", split="train", case_id="P1", extra={"site": "x"})
    result = process_slide(row, store, ProcessSettings(target_mpp=2.0))
    assert result.ok, result.failure
    assert result.n_regions == 3 and result.failure is None
    record = result.record
    assert (record.slide_id, record.n_regions, record.label, record.split, record.case_id) == ("s1", 3, "a", "train", "P1")
    assert record.mpp_source == "slide" and record.grid_shape == (2, 3) and record.extra == {"site": "x"}
    assert record.fingerprint.startswith("quickhash-1:")
    arrays = _publish(store, result)
    assert arrays.coords.tolist() == [[0, 0], [0, 1], [1, 2]]
    assert arrays.origin.tolist() == [[0, 0], [896, 0], [1792, 896]]
    np.testing.assert_allclose(arrays.foreground, 1.0, atol=1e-3)  # contours cut pixel corners
    level2 = block_mean(image, 4)  # 5× from 0.5 µm/px is the stored ds-4 level exactly
    for (r, c), region in zip(arrays.coords, np.asarray(arrays.regions)):
        np.testing.assert_array_equal(region, level2[r * R : (r + 1) * R, c * R : (c + 1) * R])
    attrs = arrays.attrs
    assert (attrs["mpp0"], attrs["mpp_source"], attrs["level"], attrs["resize_factor"]) == (0.5, "slide", 2, 1.0)
    assert attrs["grid_shape"] == [2, 3] and attrs["tissue_source"] == "segmentation"
    assert attrs["tissue_geojson"]["type"] == "FeatureCollection"


def test_manifest_mpp_overrides_slide_metadata(tmp_path, slide):
    path, image = slide
    store = _store(tmp_path)
    # Claim 0.25 µm/px: a 5× region now spans 1792 level-0 px, so only cell (0, 0) remains.
    row = ManifestRow(slide_id="s2", path=str(path), mpp=0.25)
    result = process_slide(row, store, ProcessSettings(target_mpp=2.0))
    assert result.ok and result.record.mpp_source == "manifest"
    arrays = _publish(store, result)
    assert arrays.attrs["mpp0"] == 0.25 and arrays.attrs["level"] == 2 and arrays.attrs["resize_factor"] == 2.0
    assert arrays.coords.tolist() == [[0, 0]] and arrays.origin.tolist() == [[0, 0]]
    np.testing.assert_array_equal(np.asarray(arrays.regions)[0], block_mean(block_mean(image, 4)[:448, :448], 2))


def test_manifest_tissue_geojson_replaces_segmentation(tmp_path, slide):
    path, _ = slide
    geojson = tmp_path / "t.geojson"
    geojson.write_text(json.dumps(tissue_to_geojson(box(896, 896, 1792, 1792))))  # a white area
    store = _store(tmp_path)
    row = ManifestRow(slide_id="s3", path=str(path), tissue_geojson=str(geojson))
    result = process_slide(row, store, ProcessSettings(target_mpp=2.0))
    assert result.ok
    arrays = _publish(store, result)
    assert arrays.coords.tolist() == [[1, 1]] and arrays.attrs["tissue_source"] == "manifest"
    assert (np.asarray(arrays.regions) == 255).all()


def test_failures_are_specific_and_never_raise(tmp_path, slide):
    store = _store(tmp_path)
    settings = ProcessSettings(target_mpp=2.0)
    nompp = tmp_path / "nompp.tif"
    write_synthetic_slide(nompp, width=512, height=512, mpp=0.5, with_mpp=False, tissue_rects=[(0, 0, 512, 512)])
    blank = tmp_path / "blank.tif"
    write_synthetic_slide(blank, width=1024, height=1024, mpp=0.5)
    text = tmp_path / "notes.svs"
    text.write_text("hello")
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(slide[0].read_bytes()[:20000])
    bad_geojson = tmp_path / "bad.geojson"
    bad_geojson.write_text("[{")
    cases = {
        "missing": (ManifestRow(slide_id="m", path=str(tmp_path / "gone.svs")), "SlideNotFoundError", "slide file not found"),
        "notslide": (ManifestRow(slide_id="n", path=str(text)), "NotASlideError", "not a slide OpenSlide can read"),
        "truncated": (ManifestRow(slide_id="t", path=str(truncated)), "UnreadableSlideError", "truncated file"),
        "nompp": (ManifestRow(slide_id="p", path=str(nompp)), "NoMppError", "no MPP"),
        "notissue": (ManifestRow(slide_id="b", path=str(blank)), "NoTissueError", "no tissue regions with ≥ 0.5 foreground"),
        "geojson": (
            ManifestRow(slide_id="g", path=str(slide[0]), tissue_geojson=str(bad_geojson)),
            "TissueGeojsonError", "cannot read tissue GeoJSON",
        ),
    }
    for row, error_type, message in cases.values():
        result = process_slide(row, store, settings)
        assert not result.ok and result.record is None and result.n_regions == 0
        assert result.failure.error_type == error_type, result.failure
        assert message in result.failure.reason
        assert result.failure.slide_id == row.slide_id and result.failure.source_path == row.path
    # A store that does not exist: an unexpected error, reported with its type.
    result = process_slide(ManifestRow(slide_id="x", path=str(slide[0])), str(tmp_path / "nostore"), settings)
    assert not result.ok and result.failure.error_type == "NotATileStoreError"
    assert "NotATileStoreError" in result.failure.reason
