"""The sample slide cache check and the generated demo cohort."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.demo_cohort import (
    SAMPLE_NAME,
    SampleSlideError,
    cohort_plan,
    demo_manifest,
    fetch_sample_slide,
    make_demo_cohort,
)
from pipeline.grid import region_grid
from pipeline.manifest import load_manifest
from pipeline.slide import open_slide, read_rgb, resolve_mpp
from pipeline.tissue import TissueSettings, segment_tissue

REPO = Path(__file__).resolve().parents[2]


def test_cached_sample_is_checked(tmp_path, real_slide_path):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(real_slide_path, good / SAMPLE_NAME)
    assert fetch_sample_slide(good) == good / SAMPLE_NAME
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SAMPLE_NAME).write_bytes(b"not the slide")
    with pytest.raises(SampleSlideError, match="sha256"):
        fetch_sample_slide(bad)


def test_plan_groups_splits_by_case():
    plan = cohort_plan()
    assert len(plan) == 12 and len({p.slide_id for p in plan}) == 12
    for label in ("hematoxylin-rich", "eosin-rich"):
        mine = [p for p in plan if p.label == label]
        assert [p.split for p in mine].count("val") == 2
        for case in {p.case_id for p in mine}:
            assert len({p.split for p in mine if p.case_id == case}) == 1


def test_committed_manifest_matches_the_generator():
    committed = pd.read_csv(REPO / "data_manifests" / "demo.csv", dtype=str, keep_default_na=False)
    table = demo_manifest(
        REPO / "data" / "sample" / SAMPLE_NAME, REPO / "data" / "demo", cohort_plan(),
        manifest_path=REPO / "data_manifests" / "demo.csv",
    )
    pd.testing.assert_frame_equal(committed, table.astype(str))


def test_cohort_slides_are_labelled_pyramids_with_enough_tissue(tmp_path, real_slide_path):
    manifest = tmp_path / "manifests" / "demo.csv"
    make_demo_cohort(real_slide_path, tmp_path / "demo", manifest_path=manifest, n_per_class=1)
    rows = load_manifest(manifest)
    assert [r.label for r in rows] == [None, "hematoxylin-rich", "eosin-rich"]
    means = {}
    for row in rows[1:]:
        slide = open_slide(row.path)
        assert slide.level_count == 2 and slide.properties["openslide.vendor"] == "generic-tiff"
        mpp0, source = resolve_mpp(slide, None)
        assert (mpp0, source) == (1.0, "slide")
        width, height = slide.level_dimensions[0]
        tissue = segment_tissue(slide, mpp0, TissueSettings())
        assert len(region_grid(width, height, mpp0, 2.0, 224, tissue, 0.5)) >= 4
        pixels = read_rgb(slide, (0, 0), 1, slide.level_dimensions[1]).reshape(-1, 3).astype(float)
        means[row.label] = pixels[pixels.min(axis=1) < 200].mean(axis=0)
    # Hematoxylin-rich tissue is bluer (less red than blue), eosin-rich tissue redder.
    h, e = means["hematoxylin-rich"], means["eosin-rich"]
    assert h[2] - h[0] > e[2] - e[0] + 20
    # Deterministic: a second generation writes identical files.
    again = tmp_path / "again"
    make_demo_cohort(real_slide_path, again, n_per_class=1)
    for row in rows[1:]:
        assert (again / Path(row.path).name).read_bytes() == Path(row.path).read_bytes()
