"""A build's outcome: the printed summary and the per-slide status CSV (`build_status.csv`)."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.schema.commit import fsync_file
from pipeline.schema.format import STATUS_CSV, FailureRecord

STATES = ("written", "skipped", "failed", "missing", "pruned")
STATUS_COLUMNS = ("slide_id", "state", "n_regions", "seconds", "reason")


@dataclass(frozen=True, kw_only=True)
class SlideStatus:
    """One manifest slide in this build. state: written (tiled now), skipped (complete and
    unchanged), failed, missing (file absent, --skip-missing), pruned (removed, --prune);
    n_regions: regions stored (0 unless complete); seconds: task wall time (0 when skipped)."""

    slide_id: str
    state: str
    n_regions: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class BuildSummary:
    """Outcome of a build: slide ids written now, skipped (complete, unchanged) and failed;
    stale: in the store but not in the manifest (kept unless pruned); repaired: slides
    `--repair` found corrupt or missing and redid; statuses: one per slide, as in the CSV."""

    store_path: str
    total: int
    written: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    failures: tuple[FailureRecord, ...] = ()
    n_regions: int = 0
    seconds: float = 0.0
    reconciled: dict[str, tuple[str, ...]] = field(default_factory=dict)
    stale: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()
    statuses: tuple[SlideStatus, ...] = ()
    status_csv: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        """Human-readable summary, failures listed with their reasons."""
        lines = [
            f"tile store {self.store_path}: {self.total} slides in the manifest; "
            f"{len(self.written)} written ({self.n_regions} regions), {len(self.skipped)} already complete, "
            f"{len(self.failures)} failed, in {self.seconds:.1f} s",
        ]
        for kind, ids in self.reconciled.items():
            if ids:
                lines.append(f"  reconciled ({kind}): {_some(ids)}")
        if self.repaired:
            lines.append(f"  repaired (corrupt or missing, redone): {_some(self.repaired)}")
        if self.pruned:
            lines.append(f"  pruned (not in the manifest, removed): {_some(self.pruned)}")
        if self.stale:
            lines.append(
                f"  {len(self.stale)} slide(s) in the store are not in the manifest: {_some(self.stale)} "
                "(kept; `pm-tiles build --prune` removes them)"
            )
        for failure in self.failures:
            lines.append(f"  FAILED {failure.slide_id} ({failure.source_path}): {failure.reason}")
        if self.status_csv:
            lines.append(f"  per-slide status: {self.status_csv}")
        return "\n".join(lines)


def _some(ids: tuple[str, ...], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")


def write_status_csv(store_path: str | os.PathLike, statuses: tuple[SlideStatus, ...]) -> Path:
    """Write `<store>/build_status.csv` atomically (slide_id, state, n_regions, seconds, reason)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(STATUS_COLUMNS)
    for status in sorted(statuses, key=lambda s: s.slide_id):
        writer.writerow([status.slide_id, status.state, status.n_regions, f"{status.seconds:.3f}", status.reason])
    path = Path(store_path) / STATUS_CSV
    aside = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(aside, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
        fsync_file(handle)
    os.replace(aside, path)
    return path
