"""Run logs: a console progress bar, `metrics.csv` and TensorBoard, on rank 0 only.

`metrics.csv` has one row per logged optimizer step (phase "train") and one per
validation (phase "val"); columns are the union of every metric seen, so the
file is rewritten when a new metric first appears. On resume, rows after the
resumed step are dropped so the file describes one consistent trajectory.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

FIXED_COLUMNS = ("phase", "step", "epoch")


class RunLogger:
    """Logs scalars of one run under `out_dir` (`metrics.csv`, `tensorboard/`).

    enabled=False (ranks > 0) makes every call a no-op.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool = True,
        total_steps: int = 0,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.csv_path = self.out_dir / "metrics.csv"
        self.tb_dir = self.out_dir / "tensorboard"
        self._rows: list[dict[str, Any]] = []
        self._columns: list[str] = list(FIXED_COLUMNS)
        self._writer = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._load_existing(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events from steps after the resumed one are dropped; start_step's own rows stay (as in the CSV)
            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=start_step + 1 if start_step else None)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _load_existing(self, start_step: int) -> None:
        if not self.csv_path.exists() or start_step == 0:
            return
        with open(self.csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            self._columns = list(reader.fieldnames or FIXED_COLUMNS)
            self._rows = [row for row in reader if int(row["step"]) <= start_step]
        self._rewrite()

    def log(self, phase: str, step: int, epoch: int, metrics: Mapping[str, float]) -> None:
        """Record one row: phase "train" (one optimizer step) or "val"."""
        if not self.enabled:
            return
        row = {"phase": phase, "step": step, "epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
        self._rows.append(row)
        new_columns = [k for k in row if k not in self._columns]
        if new_columns:
            self._columns.extend(new_columns)
            self._rewrite()
        else:
            self._append(row)
        if self._writer is not None:
            for name, value in metrics.items():
                if math.isfinite(float(value)):
                    self._writer.add_scalar(f"{phase}/{name}", float(value), step)
        if self._bar is not None and phase == "train":
            shown = {k: metrics[k] for k in ("loss", "lr", "samples_per_s") if k in metrics}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if self.enabled:
            (self._bar.write if self._bar is not None else tqdm.write)(text)

    def _rewrite(self) -> None:
        with open(self.csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns, restval="")
            writer.writeheader()
            writer.writerows(self._rows)

    def _append(self, row: Mapping[str, Any]) -> None:
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._columns, restval="").writerow(row)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
