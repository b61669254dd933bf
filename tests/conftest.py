"""Shared fixtures: the real sample slide (DESIGN.md §7)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def real_slide_path() -> Path:
    """Path of the real Aperio CMU-1 region (20×, 0.499 µm/px, 2220×2967), fetched and sha256-checked once."""
    from pipeline.demo_cohort import fetch_sample_slide

    return fetch_sample_slide(SAMPLE_DIR)
