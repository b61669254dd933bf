"""Time another checkout's `process_slide` side by side with this one (`bench/tiles.py --compare`).

`CheckoutPool(path, n)` starts n long-lived worker processes that import `pipeline` from the
checkout at `path` (e.g. `git archive <commit> pipeline | tar -x -C /tmp/before`) and tile one
slide per request; `submit(...)` has `ProcessPoolExecutor.submit`'s shape, so the benchmark's
round-robin timing runs them like its own methods. A request and its answer are one line each
over the worker's pipes (well under a millisecond against a slide's tens of milliseconds).

Run as a script, this file is the worker: `python bench/checkout_pool.py CHECKOUT`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve()


class _Answer:
    """The pending answer of one request (`.result()`: regions tiled)."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc

    def result(self) -> int:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"checkout worker {self._proc.pid} exited ({self._proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return int(answer["n_regions"])


class CheckoutPool:
    """n worker processes tiling with the checkout at `path`; requests go round-robin."""

    def __init__(self, path: str | os.PathLike, n: int):
        self.path = str(Path(path).resolve())
        if not (Path(self.path) / "pipeline" / "__init__.py").is_file():
            raise ValueError(f"{self.path} holds no pipeline package to compare with")
        self._procs = [
            subprocess.Popen([sys.executable, str(WORKER), self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        self._next = 0

    def submit(self, function, row, store: str, settings) -> _Answer:
        """Tile `row` into `store` with `settings` (a ProcessSettings) in the next worker;
        `function` is ignored (it names this checkout's worker function, for the table)."""
        proc = self._procs[self._next % len(self._procs)]
        self._next += 1
        request = {"slide_id": row.slide_id, "path": row.path, "store": store,
                   "settings": {"target_mpp": settings.target_mpp, "reader": settings.reader,
                                "scaled_decode": settings.scaled_decode}}
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        return _Answer(proc)

    def close(self) -> None:
        for proc in self._procs:
            proc.stdin.close()
        for proc in self._procs:
            proc.wait()


def _serve(checkout: str) -> None:
    sys.path.insert(0, checkout)
    import pipeline
    from pipeline.manifest import ManifestRow
    from pipeline.process import ProcessSettings, process_slide

    if not pipeline.__file__.startswith(checkout):
        raise SystemExit(f"imported pipeline from {pipeline.__file__}, not {checkout}")
    for line in sys.stdin:
        request = json.loads(line)
        row = ManifestRow(slide_id=request["slide_id"], path=request["path"])
        result = process_slide(row, request["store"], ProcessSettings(**request["settings"]))
        answer = {"n_regions": result.n_regions} if result.ok else {"error": result.failure.reason}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(str(Path(sys.argv[1]).resolve()))
