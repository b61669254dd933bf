"""Manifest loading/validation (DESIGN.md §4) and `pm-tiles manifest`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.manifest import ManifestError, load_manifest, sanitize_slide_id, write_manifest
from pipeline.manifest_cli import manifest_command


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_valid_manifest_resolves_paths_and_keeps_extra_columns(tmp_path):
    _touch(tmp_path / "slides" / "a.svs")
    absolute = _touch(tmp_path / "elsewhere" / "b.tif")
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    manifest = tmp_path / "m" / "ds.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "slide_id,path,label,split,case_id,mpp,tissue_geojson,site\n"
        "a,../slides/a.svs,tumour,train,P1,0.25,../a.geojson,lab1\n"
        f"b-2.x,{absolute},,val,P2,,,\n"
    )
    rows = load_manifest(manifest)
    assert [r.slide_id for r in rows] == ["a", "b-2.x"]
    assert rows[0].path == str((tmp_path / "slides" / "a.svs").resolve())
    assert rows[0].mpp == 0.25 and rows[0].label == "tumour" and rows[0].case_id == "P1"
    assert rows[0].tissue_geojson == str((tmp_path / "a.geojson").resolve())
    assert rows[0].extra == {"site": "lab1"} and rows[0].line == 2
    assert rows[1].label is None and rows[1].mpp is None and rows[1].extra == {} and rows[1].line == 3


def test_every_bad_row_is_reported_with_its_line(tmp_path):
    _touch(tmp_path / "ok.svs")
    manifest = tmp_path / "bad.csv"
    manifest.write_text(
        "slide_id,path,mpp,tissue_geojson\n"
        "ok,ok.svs,,\n"            # line 2: fine
        "ok,ok.svs,,\n"            # line 3: duplicate
        "bad id,ok.svs,,\n"        # line 4: space in id
        "gone,missing.svs,,\n"     # line 5: missing file
        "neg,ok.svs,-1,\n"         # line 6: bad mpp
        "geo,ok.svs,,nope.geojson\n"  # line 7: missing geojson
        ",ok.svs,,\n"              # line 8: empty id
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    lines = {line for line, _ in caught.value.problems}
    assert lines == {3, 4, 5, 6, 7, 8}
    text = str(caught.value)
    assert "line 3: duplicate slide_id 'ok' (first on line 2)" in text
    assert "line 4: slide_id 'bad id'" in text
    assert "line 5: slide file not found" in text
    assert "line 6: mpp '-1' is not a positive number" in text
    assert "line 7: tissue_geojson file not found" in text
    assert "line 8: empty slide_id" in text


def test_ids_that_are_not_store_keys_are_rejected(tmp_path):
    # '.' and '..' match [A-Za-z0-9._-]+ but are path parts (slides/.. is the store root), and
    # '.tmp-…' is the temporary-group namespace that every run's reconcile deletes.
    # 'zarr.json' would be slides/zarr.json, the slides group's own metadata (any case: stores
    # may sit on case-insensitive file systems).
    names = ["fine.1", ".", "..", ".tmp-x", "zarr.json", "ZARR.JSON", ".hidden"]
    for i in range(len(names)):
        _touch(tmp_path / f"s{i}.svs")
    manifest = tmp_path / "keys.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"{n},s{i}.svs\n" for i, n in enumerate(names)))
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert {line for line, _ in caught.value.problems} == {3, 4, 5, 6, 7, 8}
    assert "line 5: slide_id '.tmp-x' is a name the store reserves" in str(caught.value)
    assert "line 6: slide_id 'zarr.json' is a name the store reserves" in str(caught.value)


def test_same_file_under_two_ids_is_an_error(tmp_path):
    _touch(tmp_path / "a.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\na,a.svs\nb,{tmp_path / 'x' / '..' / 'a.svs'}\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert caught.value.problems == [(3, f"file {tmp_path / 'a.svs'} is listed twice: as 'b' and as 'a' (line 2)")]


def test_case_in_two_splits_is_patient_leakage(tmp_path):
    for name in "abcd":
        _touch(tmp_path / f"{name}.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,split,case_id\na,a.svs,train,p1\nb,b.svs,train,p1\nc,c.svs,test,p1\nd,d.svs,test,p2\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert [line for line, _ in caught.value.problems] == [4]
    assert "case_id 'p1' is in split 'test' here and in split 'train' on line 2" in str(caught.value)
    assert "patient leakage" in str(caught.value)


def test_skip_missing_returns_rows_whose_file_is_missing(tmp_path):
    _touch(tmp_path / "a.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\na,a.svs\ngone,gone.svs\n")
    with pytest.raises(ManifestError, match="pass --skip-missing"):
        load_manifest(manifest)
    rows = load_manifest(manifest, skip_missing=True)
    assert [r.slide_id for r in rows] == ["a", "gone"] and not Path(rows[1].path).exists()


def test_missing_required_column_and_missing_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,label\na,x\n")
    with pytest.raises(ManifestError, match="missing required column.*path"):
        load_manifest(manifest)
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "absent.csv")


def test_sanitize_slide_id():
    assert sanitize_slide_id("TCGA-AB-1234-01Z-00-DX1.ABCD") == "TCGA-AB-1234-01Z-00-DX1.ABCD"
    assert sanitize_slide_id("my slide (copy)") == "my_slide_copy"


def test_write_manifest_joins_panda_style_labels(tmp_path):
    for name in ("abc123.tiff", "def456.svs", "ghi789.ndpi", "notes.txt"):
        _touch(tmp_path / "slides" / name)
    labels = tmp_path / "train.csv"
    labels.write_text("image_id,data_provider,isup_grade,gleason_score\nabc123,karolinska,3,4+3\ndef456,radboud,0,0+0\n")
    table = write_manifest(tmp_path / "slides", labels, id_column="image_id", label_column="isup_grade")
    assert list(table["slide_id"]) == ["abc123", "def456", "ghi789"]
    assert list(table["label"]) == ["3", "0", ""]
    assert list(table["data_provider"]) == ["karolinska", "radboud", ""]
    assert all(Path(p).is_absolute() for p in table["path"])


def test_manifest_command_prints_a_loadable_csv(tmp_path):
    _touch(tmp_path / "slides" / "s1.svs")
    _touch(tmp_path / "slides" / "sub" / "s2.tif")
    result = CliRunner().invoke(manifest_command, [str(tmp_path / "slides")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output), keep_default_na=False)
    assert list(table["slide_id"]) == ["s1", "s2"]
    out = tmp_path / "m.csv"
    out.write_text(result.output)
    assert [r.slide_id for r in load_manifest(out)] == ["s1", "s2"]


def test_manifest_command_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(manifest_command, [str(tmp_path / "empty")])
    assert result.exit_code != 0 and "no slide files" in result.output
    _touch(tmp_path / "s" / "a.svs")
    labels = tmp_path / "l.csv"
    labels.write_text("image_id,isup_grade\na,1\n")
    result = CliRunner().invoke(manifest_command, [str(tmp_path / "s"), "--labels", str(labels), "--label-column", "grade"])
    assert result.exit_code != 0 and "column 'grade' not in" in result.output


def test_write_manifest_lists_one_file_per_dicom_folder(tmp_path):
    for name in ("a/1.dcm", "a/2.dcm", "b.mrxs", "b/Data0000.dat", ".hidden/c.svs"):
        _touch(tmp_path / name)
    table = write_manifest(tmp_path)
    assert list(table["slide_id"]) == ["a", "b"]
    assert table["path"][0].endswith("1.dcm")


def test_unmatched_labels_warning_shows_ids_and_likely_cause(tmp_path):
    for name in ("Slide_A", "slide_b", "c"):
        _touch(tmp_path / "s" / f"{name}.svs")
    labels = tmp_path / "l.csv"
    labels.write_text("image,grade,patient\nSlide_A.svs,1,p1\nslide_b.svs,0,p2\nc,1,p3\n")
    result = CliRunner().invoke(
        manifest_command, [str(tmp_path / "s"), "--labels", str(labels), "--case-column", "patient"],
    )
    assert result.exit_code == 0, result.output
    assert "warning: 2 of 3 slides have no label" in result.output
    assert "'Slide_A'" in result.output and "'Slide_A.svs'" in result.output  # an unmatched id and a label id
    assert "carry file extensions" in result.output
    table = pd.read_csv(io.StringIO(result.stdout.split("warning:")[0]), dtype=str, keep_default_na=False)
    assert table.set_index("slide_id").loc["c", "case_id"] == "p3"


def test_unmatched_labels_by_letter_case(tmp_path):
    _touch(tmp_path / "s" / "ABC.svs")
    _touch(tmp_path / "s" / "d.svs")
    labels = tmp_path / "l.csv"
    labels.write_text("image,grade\nabc,1\nd,0\n")
    table = write_manifest(tmp_path / "s", labels)
    assert "1 of 2 slides have no label" in table.attrs["label_warning"]
    assert "letter case differs" in table.attrs["label_warning"]
