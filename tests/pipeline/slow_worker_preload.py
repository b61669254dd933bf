"""Dask worker preload for the cluster tests: every region written takes SLOW_REGION_SECONDS,
so a test can kill a worker or the driver while a slide is being written."""

from __future__ import annotations

import os
import time

from pipeline import store_writer

# distributed may run a preload more than once in a process: wrap the original only once.
_real_iter_regions = getattr(store_writer, "_unslowed_iter_regions", store_writer._iter_regions)
store_writer._unslowed_iter_regions = _real_iter_regions
_DELAY = float(os.environ.get("SLOW_REGION_SECONDS", "0.1"))


def _slow_iter_regions(slide_id, regions, size):
    for region in _real_iter_regions(slide_id, regions, size):
        time.sleep(_DELAY)
        yield region


store_writer._iter_regions = _slow_iter_regions
