"""RunLogger on resume: metrics.csv and TensorBoard both keep the resumed step's rows and drop later ones."""

from __future__ import annotations

import csv
import time

import pytest

from trainer.engine.run_log import RunLogger


def test_resume_keeps_the_resumed_steps_rows_in_csv_and_tensorboard(tmp_path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    first = RunLogger(tmp_path, progress=False)
    first.log("train", 1, 0, {"loss": 1.0})
    first.log("train", 2, 0, {"loss": 0.9})
    first.log("val", 2, 0, {"accuracy": 0.5})  # epoch 0 ends at step 2; the checkpoint holds step 2
    first.log("train", 3, 1, {"loss": 0.8})  # logged, then the run died before the next checkpoint
    first.close()
    time.sleep(1.1)  # event files are named by the second: keep the two runs' files in order
    resumed = RunLogger(tmp_path, start_step=2, progress=False)
    resumed.log("train", 3, 1, {"loss": 0.7})
    resumed.log("train", 4, 1, {"loss": 0.6})
    resumed.close()

    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = [(r["phase"], int(r["step"]), r["loss"] or r["accuracy"]) for r in csv.DictReader(handle)]
    assert rows == [("train", 1, "1.0"), ("train", 2, "0.9"), ("val", 2, "0.5"), ("train", 3, "0.7"),
                    ("train", 4, "0.6")]
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, round(e.value, 3)) for e in events.Scalars("train/loss")]
    assert loss == [(1, 1.0), (2, 0.9), (3, 0.7), (4, 0.6)]
    assert [(e.step, e.value) for e in events.Scalars("val/accuracy")] == [(2, 0.5)]
