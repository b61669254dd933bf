"""Dataset manifests (DESIGN.md §4): load and validate one, or write one from a folder of slides.

A manifest is a CSV with one row per slide. Required columns: `slide_id`
(unique, `[A-Za-z0-9._-]+`) and `path` (absolute, or relative to the manifest's
folder). Optional: `label`, `split`, `case_id`, `mpp` (µm/px, overrides the
slide's metadata), `tissue_geojson` (external tissue polygons, same path rule).
Any other column is carried into the store's slide table as `extra`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.schema.format import slide_id_problem

REQUIRED_COLUMNS = ("slide_id", "path")
KNOWN_COLUMNS = ("slide_id", "path", "label", "split", "case_id", "mpp", "tissue_geojson")

# File extensions OpenSlide opens (its vendor formats, generic TIFF and DICOM).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
    ".svslide", ".bif", ".dcm", ".czi",
)


_SKIP_HINT = " (pass --skip-missing to record missing slides as failed and tile the others)"


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` lists every bad row as `(line, message)`."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]]):
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  line {line}: {message}" if line else f"  {message}" for line, message in problems)
        super().__init__(f"manifest {self.path} has {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True, kw_only=True)
class ManifestRow:
    """One validated manifest row.

    path, tissue_geojson: resolved absolute paths; mpp: level-0 µm/px override or None;
    extra: the other columns (empty cells dropped); line: 1-based line in the CSV (header = 1).
    """

    slide_id: str
    path: str
    label: str | None = None
    split: str | None = None
    case_id: str | None = None
    mpp: float | None = None
    tissue_geojson: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0


def _cell(record: dict[str, str | None], column: str) -> str | None:
    value = record.get(column)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _resolve(base: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    return (candidate if candidate.is_absolute() else base / candidate).resolve()


def load_manifest(path: str | Path, *, skip_missing: bool = False) -> list[ManifestRow]:
    """Read and validate a manifest; raise `ManifestError` listing every bad row with its line.

    Checks: required columns; slide_id present, well-formed, not a name the store
    reserves, and unique; the slide file exists (unless `skip_missing`: then a row whose
    file is missing is returned, and the build records it as a failed slide); no file
    under two slide ids; no case_id in two splits (one patient on both sides of a split);
    mpp a positive finite number when given; tissue_geojson exists when given.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise ManifestError(manifest, [(0, f"manifest file not found: {manifest}")])
    base = manifest.resolve().parent
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ManifestError(manifest, [(1, f"missing required column(s) {', '.join(missing)}; header is {columns}")])
        reader.fieldnames = columns
        records = [(reader.line_num, record) for record in reader]

    problems: list[tuple[int, str]] = []
    rows: list[ManifestRow] = []
    first_line: dict[str, int] = {}
    first_path: dict[str, tuple[int, str | None]] = {}
    case_splits: dict[str, dict[str, int]] = {}  # case_id → split → first line
    for line, record in records:
        if None in record:
            problems.append((line, f"has {len(columns) + len(record[None])} cells but the header has {len(columns)}"))
            continue
        if all(not (v or "").strip() for v in record.values()):
            continue
        bad: list[str] = []
        slide_id = _cell(record, "slide_id")
        if slide_id is None:
            bad.append("empty slide_id")
        elif (problem := slide_id_problem(slide_id)) is not None:
            bad.append(problem)
        elif slide_id in first_line:
            bad.append(f"duplicate slide_id {slide_id!r} (first on line {first_line[slide_id]})")
        else:
            first_line[slide_id] = line

        raw_path = _cell(record, "path")
        slide_path: Path | None = None
        if raw_path is None:
            bad.append("empty path")
        else:
            slide_path = _resolve(base, raw_path)
            if not slide_path.is_file() and not (skip_missing and not slide_path.exists()):
                bad.append(f"slide file not found: {slide_path}" + ("" if slide_path.exists() else _SKIP_HINT))
            elif str(slide_path) in first_path:
                other_line, other_id = first_path[str(slide_path)]
                bad.append(f"file {slide_path} is listed twice: as {slide_id!r} and as {other_id!r} (line {other_line})")
            else:
                first_path[str(slide_path)] = (line, slide_id)

        mpp: float | None = None
        raw_mpp = _cell(record, "mpp")
        if raw_mpp is not None:
            try:
                mpp = float(raw_mpp)
            except ValueError:
                mpp = None
            if mpp is None or not math.isfinite(mpp) or mpp <= 0:
                bad.append(f"mpp {raw_mpp!r} is not a positive number (µm/px)")
                mpp = None

        geojson: Path | None = None
        raw_geojson = _cell(record, "tissue_geojson")
        if raw_geojson is not None:
            geojson = _resolve(base, raw_geojson)
            if not geojson.is_file():
                bad.append(f"tissue_geojson file not found: {geojson}")

        case_id, split = _cell(record, "case_id"), _cell(record, "split")
        if case_id is not None and split is not None:
            splits = case_splits.setdefault(case_id, {})
            if split not in splits and splits:
                other_split, other_line = next(iter(splits.items()))
                bad.append(
                    f"case_id {case_id!r} is in split {split!r} here and in split {other_split!r} on line "
                    f"{other_line}: one patient's slides must stay in one split (patient leakage)"
                )
            splits.setdefault(split, line)

        if bad:
            problems.extend((line, message) for message in bad)
            continue
        extra = {k: v.strip() for k, v in record.items() if k not in KNOWN_COLUMNS and v is not None and v.strip()}
        rows.append(
            ManifestRow(
                slide_id=slide_id,
                path=str(slide_path),
                label=_cell(record, "label"),
                split=_cell(record, "split"),
                case_id=_cell(record, "case_id"),
                mpp=mpp,
                tissue_geojson=str(geojson) if geojson else None,
                extra=extra,
                line=line,
            )
        )
    if problems:
        raise ManifestError(manifest, problems)
    if not rows:
        raise ManifestError(manifest, [(0, "manifest lists no slides")])
    return rows


def sanitize_slide_id(name: str) -> str:
    """A file stem made into a valid slide_id: runs of other characters become '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return cleaned or "slide"


def _slide_files(slide_dir: Path) -> list[Path]:
    """Slide files under a folder (recursive, hidden paths skipped), sorted.

    A DICOM slide is a folder of .dcm files that OpenSlide opens through any one of them,
    so only the first .dcm of each folder is listed. MIRAX data files (.dat, .ini) and
    VMS's .jpg are not slide extensions, so only their index file is listed.
    """
    files = []
    dicom_folders: set[Path] = set()
    for candidate in sorted(slide_dir.rglob("*")):
        suffix = candidate.suffix.lower()
        if not candidate.is_file() or suffix not in SLIDE_EXTENSIONS:
            continue
        if any(part.startswith(".") for part in candidate.relative_to(slide_dir).parts):
            continue
        if suffix == ".dcm":
            if candidate.parent in dicom_folders:
                continue
            dicom_folders.add(candidate.parent)
        files.append(candidate)
    return files


def write_manifest(
    slide_dir: str | Path,
    labels_csv: str | Path | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    case_column: str | None = None,
) -> pd.DataFrame:
    """Manifest for every slide file under `slide_dir` (absolute paths), labels optionally joined.

    slide_id is the file stem, sanitised (a DICOM series takes its folder's name).
    labels_csv: a table such as PANDA's `train.csv`; `id_column` (default: its first
    column) is matched against slide_id, `label_column` (default: its second column)
    becomes `label`, `case_column` (optional) becomes `case_id`; its other columns are
    carried along. Slides without a label get an empty one; when some are unmatched,
    `table.attrs["label_warning"]` says how many, shows examples and the likely cause.
    Raises ValueError on an empty folder, duplicate ids or unknown columns.
    """
    folder = Path(slide_dir)
    if not folder.is_dir():
        raise ValueError(f"slide folder not found: {folder}")
    files = _slide_files(folder)
    if not files:
        raise ValueError(f"no slide files ({', '.join(SLIDE_EXTENSIONS)}) under {folder}")
    ids = [sanitize_slide_id(f.parent.name if f.suffix.lower() == ".dcm" else f.stem) for f in files]
    seen: dict[str, Path] = {}
    for slide_id, file in zip(ids, files):
        if slide_id in seen:
            raise ValueError(f"two slides get the id {slide_id!r}: {seen[slide_id]} and {file}; rename one")
        seen[slide_id] = file
    table = pd.DataFrame({"slide_id": ids, "path": [str(f.resolve()) for f in files]})
    if labels_csv is None:
        table["label"] = ""
        return table
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    if labels.shape[1] < 2 and (id_column is None or label_column is None):
        raise ValueError(f"{labels_csv} needs an id and a label column; it has {list(labels.columns)}")
    id_column = id_column or labels.columns[0]
    label_column = label_column or labels.columns[1]
    for column in (id_column, label_column, *([case_column] if case_column else [])):
        if column not in labels.columns:
            raise ValueError(f"column {column!r} not in {labels_csv}; columns are {list(labels.columns)}")
    if labels[id_column].duplicated().any():
        dupes = sorted(labels.loc[labels[id_column].duplicated(), id_column].unique())[:5]
        raise ValueError(f"{labels_csv}: duplicate ids in {id_column!r}, e.g. {dupes}")
    renames = {id_column: "slide_id", label_column: "label", **({case_column: "case_id"} if case_column else {})}
    labels = labels.drop(columns=[c for c in ("slide_id", "label", "case_id") if c in labels.columns and c not in renames])
    labels = labels.rename(columns=renames)
    raw_ids = labels["slide_id"].tolist()
    labels["slide_id"] = labels["slide_id"].map(sanitize_slide_id)
    drop = [c for c in ("path",) if c in labels.columns]
    merged = table.merge(labels.drop(columns=drop), on="slide_id", how="left").fillna("")
    unmatched = [i for i in ids if i not in set(labels["slide_id"])]
    if unmatched:
        merged.attrs["label_warning"] = unmatched_labels_message(unmatched, raw_ids, len(ids), str(labels_csv), id_column)
    return merged


def unmatched_labels_message(unmatched: list[str], label_ids: list[str], n_slides: int, labels_csv: str,
                             id_column: str) -> str:
    """Warning for slides that found no label: how many, a few of them, a few of the
    labels' ids, and the likely cause (file extensions in the ids, or letter case)."""
    def stem(value: str) -> str:
        name = value.rsplit("/", 1)[-1]
        for ext in SLIDE_EXTENSIONS:
            if name.lower().endswith(ext):
                return name[: -len(ext)]
        return name

    known = {sanitize_slide_id(v) for v in label_ids}
    lines = [
        f"warning: {len(unmatched)} of {n_slides} slides have no label in {labels_csv} (column {id_column!r}), "
        f"e.g. {', '.join(repr(u) for u in unmatched[:3])}; its ids look like "
        f"{', '.join(repr(v) for v in label_ids[:3])}",
    ]
    by_stem = {sanitize_slide_id(stem(v)) for v in label_ids}
    by_case = {v.lower() for v in known}
    if any(u in by_stem for u in unmatched):
        lines.append("likely cause: the labels' ids carry file extensions or folders; slide ids are file stems")
    elif any(u.lower() in by_case for u in unmatched):
        lines.append("likely cause: letter case differs between file names and the labels' ids (matching is exact)")
    elif not set(unmatched) & known:
        lines.append(f"likely cause: a different id column; pass --id-column (columns are read from {labels_csv})")
    return "\n".join(lines)
