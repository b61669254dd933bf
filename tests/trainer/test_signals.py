"""SIGINT and SIGTERM sent to a training subprocess: the step finishes, last.pt is written, the exit is non-zero,
the message says how to resume, and the run resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def train_rows(out: Path) -> int:
    metrics = out / "metrics.csv"
    return metrics.read_text().count("\ntrain,") if metrics.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_leaves_a_resumable_last_checkpoint(stain_store, tmp_path, signum) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainer.cli", "supervised", "--store", str(stain_store), "--out", str(out),
               "--model", "pixel_mamba_tiny", "--workers", "0", "--accum", "1", "--epochs", "40", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while train_rows(out) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stderr
    assert f"{signal.Signals(signum).name} received: stopped after optimizer step" in stderr
    assert f"--resume {out / 'last.pt'}" in stderr and "Traceback" not in stderr
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["step"] >= 2 and payload["step"] == train_rows(out)  # every logged step is in the checkpoint
    resumed = subprocess.run([*command[:-2], "--device", "cpu", "--resume", str(out / "last.pt"),
                              "--max-steps", str(payload["step"] + 1)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == payload["step"] + 1
