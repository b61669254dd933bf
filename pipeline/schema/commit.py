"""The per-slide commit protocol and the slide table (DESIGN.md §5).

A slide's group is written under `slides/.tmp-<slide_id>-<uuid>`, then renamed to
`slides/<slide_id>` in one `os.rename`; the driver alone then rewrites `slides.json`
atomically (write aside, fsync, `os.replace`). `reconcile` repairs what a crash can
leave between those steps. Everything here works on local paths only (writers);
`parse_table` is shared with readers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.schema.errors import SlideWriteError, TileStoreError
from pipeline.schema.format import (
    ARRAY_NAMES,
    FORMAT_VERSION,
    REGIONS,
    SLIDE_TABLE,
    SLIDES_GROUP,
    TEMP_PREFIX,
    FailureRecord,
    SlideRecord,
)


@dataclass(frozen=True, kw_only=True)
class SlideTable:
    """Contents of `slides.json`: complete slides and failures, keyed by slide id."""

    slides: dict[str, SlideRecord] = field(default_factory=dict)
    failures: dict[str, FailureRecord] = field(default_factory=dict)

    def with_slide(self, record: SlideRecord) -> "SlideTable":
        """A complete slide (re)placed; a former failure of the same id is dropped."""
        failures = {k: v for k, v in self.failures.items() if k != record.slide_id}
        return SlideTable(slides={**self.slides, record.slide_id: record}, failures=failures)

    def with_failure(self, failure: FailureRecord) -> "SlideTable":
        """A failed slide recorded; a stale complete entry of the same id is dropped (its
        group was replaced or never finished, so the table must not claim it)."""
        slides = {k: v for k, v in self.slides.items() if k != failure.slide_id}
        return SlideTable(slides=slides, failures={**self.failures, failure.slide_id: failure})

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "slides": [self.slides[k].to_json() for k in sorted(self.slides)],
            "failures": [self.failures[k].to_json() for k in sorted(self.failures)],
        }


def parse_table(data: bytes | str) -> SlideTable:
    """Parse `slides.json` bytes; TileStoreError when it is not a slide table."""
    try:
        raw = json.loads(data)
        slides = [SlideRecord.from_json(r) for r in raw["slides"]]
        failures = [FailureRecord.from_json(r) for r in raw.get("failures", [])]
    except (ValueError, KeyError, TypeError) as error:
        raise TileStoreError(f"{SLIDE_TABLE} is not a valid slide table: {error}") from error
    return SlideTable(slides={r.slide_id: r for r in slides}, failures={r.slide_id: r for r in failures})


def read_table(store_path: str | os.PathLike) -> SlideTable:
    """The slide table of a local store; an empty table when none was written yet."""
    path = Path(store_path) / SLIDE_TABLE
    if not path.exists():
        return SlideTable()
    return parse_table(path.read_bytes())


def write_table(store_path: str | os.PathLike, table: SlideTable) -> None:
    """Atomically replace `slides.json`: readers see the old table or the new one, never a mix."""
    root = Path(store_path)
    aside = root / f"{SLIDE_TABLE}.tmp-{uuid.uuid4().hex}"
    try:
        text = json.dumps(table.to_json(), separators=(",", ":"))  # one write: json.dump's many are slower
        with open(aside, "w", encoding="utf-8") as handle:
            handle.write(text)
            fsync_file(handle)
        os.replace(aside, root / SLIDE_TABLE)
    finally:
        if aside.exists():
            aside.unlink()
    fsync_dir(root)


def temp_group_name(slide_id: str) -> str:
    """Name (under `slides/`) of a fresh temporary group for `slide_id`."""
    return f"{TEMP_PREFIX}{slide_id}-{uuid.uuid4().hex}"


def commit_group(store_path: str | os.PathLike, temp_name: str, slide_id: str) -> Path:
    """Make `slides/<temp_name>` visible as `slides/<slide_id>` in one rename.

    An existing group of that id (a slide being redone) is swapped with the new one in one
    step where the OS can (Linux `renameat2(RENAME_EXCHANGE)`), so `slides/<slide_id>` is
    complete at every moment and the old group is a leftover that `reconcile` removes;
    elsewhere it is first renamed aside (a crash between the two renames loses the slide
    until it is redone). Returns the committed group's path.
    """
    slides = Path(store_path) / SLIDES_GROUP
    source, target = slides / temp_name, slides / slide_id
    if not source.is_dir():
        raise SlideWriteError(f"cannot commit slide {slide_id!r}: temporary group {source} does not exist")
    old = None
    if target.exists():
        if _exchange(source, target):
            old = source  # now holds the replaced group: a leftover `reconcile` removes
        else:  # no atomic exchange here (not Linux, or a filesystem without it): two renames
            old = slides / temp_group_name(slide_id)
            os.rename(target, old)
            os.rename(source, target)
    else:
        os.rename(source, target)
    fsync_dir(slides)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False when unsupported,
    so that replacing a slide's group never leaves a moment with no `slides/<slide_id>`."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def node_metadata(node_path: str | os.PathLike) -> Any:
    """The parsed `zarr.json` of a local zarr group or array."""
    with open(Path(node_path) / "zarr.json", encoding="utf-8") as handle:
        return json.load(handle)


def group_attributes(group_path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of a local zarr group (its `zarr.json`)."""
    return node_metadata(group_path).get("attributes", {})


def group_problem(group_path: str | os.PathLike) -> str | None:
    """Why a slide group is not complete (an array's metadata missing, the regions data file
    missing or, raw, of the wrong size), or None; stats files only, reads no data. (The small
    arrays' chunks may be absent: zarr stores no chunk that equals the fill value.)"""
    group = Path(group_path)
    try:
        attrs = group_attributes(group)
        if "checksum" not in attrs:
            return "its attributes have no checksum"
        for name in ARRAY_NAMES:
            meta = node_metadata(group / name)
            shape = meta["shape"]
            if name != REGIONS or not all(shape):
                continue
            chunk = group / name / ("c/" + "/".join("0" * len(shape)))
            if not chunk.is_file():
                return f"array {name!r} has no data file"
            codecs = meta.get("codecs") or []
            if len(codecs) == 1 and codecs[0].get("name") == "bytes":
                expected = 1
                for extent in shape:
                    expected *= extent
                if chunk.stat().st_size != expected:
                    return f"array {name!r} holds {chunk.stat().st_size} bytes, expected {expected}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable metadata ({type(error).__name__}: {error})"
    return None


def record_from_group(group_path: str | os.PathLike, slide_id: str) -> SlideRecord:
    """Rebuild a slide's table row from its committed group's attributes."""
    attrs = group_attributes(group_path)
    n_regions = attrs.get("n_regions")
    if n_regions is None:
        n_regions = node_metadata(Path(group_path) / REGIONS)["shape"][0]
    return SlideRecord(
        slide_id=slide_id,
        n_regions=int(n_regions),
        label=attrs.get("label"),
        split=attrs.get("split"),
        case_id=attrs.get("case_id"),
        source_path=str(attrs["source_path"]),
        fingerprint=str(attrs["fingerprint"]),
        checksum=str(attrs["checksum"]),
        mpp_source=str(attrs.get("mpp_source", "")),
        grid_shape=tuple(int(v) for v in attrs.get("grid_shape", (0, 0))),
        extra=dict(attrs.get("extra") or {}),
        manifest_mpp=attrs.get("manifest_mpp"),
        tissue_geojson_sha256=attrs.get("tissue_geojson_sha256"),
        upsampled=bool(attrs.get("upsampled", False)),
        reader=str(attrs.get("reader", "")),
    )


@dataclass(frozen=True, kw_only=True)
class ReconcileReport:
    """What `reconcile` changed: slide ids added/refreshed/dropped, temp names removed."""

    added: tuple[str, ...] = ()
    refreshed: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    removed_temps: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.refreshed or self.dropped or self.removed_temps)


def reconcile(store_path: str | os.PathLike, *, remove_temps: bool = True) -> tuple[SlideTable, ReconcileReport]:
    """Bring `slides.json` in line with the committed groups after a crash.

    - a committed group missing from the table (crash between rename and table update)
      is added, its record rebuilt from the group attributes; one whose checksum differs
      from its table row (a redone slide) is refreshed;
    - a group that is not complete (`group_problem`: a file missing) is never added, and
      its table row is dropped;
    - table rows whose group is missing are dropped;
    - temporary leftovers `slides/.tmp-*` and `slides.json.tmp-*` are removed (only while
      no writer runs).
    Rewrites the table only when something changed. Returns (table, report).
    """
    root = Path(store_path)
    slides_dir = root / SLIDES_GROUP
    table = read_table(root)
    added, refreshed, dropped, removed = [], [], [], []
    present = set()
    if slides_dir.is_dir():
        for entry in sorted(slides_dir.iterdir()):
            if not entry.is_dir():
                continue
            if entry.name.startswith(TEMP_PREFIX):
                if remove_temps:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
                continue
            if group_problem(entry) is not None:
                continue  # not a complete slide group
            try:
                record = record_from_group(entry, entry.name)
            except (OSError, ValueError, KeyError):
                continue  # not a committed slide group (commit writes attributes before the rename)
            present.add(entry.name)
            known = table.slides.get(entry.name)
            if known is None:
                table, _ = table.with_slide(record), added.append(entry.name)
            elif known.checksum != record.checksum:
                table, _ = table.with_slide(record), refreshed.append(entry.name)
    if remove_temps:
        for leftover in root.glob(f"{SLIDE_TABLE}.tmp-*"):
            leftover.unlink(missing_ok=True)
            removed.append(leftover.name)
    dropped = sorted(set(table.slides) - present)
    table = SlideTable(slides={k: v for k, v in table.slides.items() if k in present}, failures=table.failures)
    report = ReconcileReport(
        added=tuple(added), refreshed=tuple(refreshed), dropped=tuple(dropped), removed_temps=tuple(removed)
    )
    if report.added or report.refreshed or report.dropped:
        write_table(root, table)
    return table, report


def fsync_file(handle: IO[Any]) -> None:
    """Flush a file opened for writing and fsync it."""
    handle.flush()
    os.fsync(handle.fileno())


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
WRITEBACK_STEP = 1 << 20  # bytes between two `EarlyWriteback` requests


@functools.cache
def _sync_file_range():
    """libc's `sync_file_range` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


class EarlyWriteback:
    """Starts the disk writes of a file being streamed while it is streamed, so that its final
    `fsync_file` has little left to wait for (a 20 MB region chunk: ~30 ms of fsync otherwise).

    `written(n)` after each write; every `WRITEBACK_STEP` bytes it asks the kernel to start
    writing the bytes since the last request (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`:
    asynchronous, it promises nothing). Durability is unchanged: the fsync before the commit
    is still what makes the file durable. Does nothing where the call does not exist.
    """

    def __init__(self, fd: int):
        self._fd, self._call = fd, _sync_file_range()
        self._started = self._written = 0

    def written(self, nbytes: int) -> None:
        self._written += nbytes
        if self._call is not None and self._written - self._started >= WRITEBACK_STEP:
            self._call(self._fd, self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = self._written


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
