"""One measurement per fresh process, so each peak RSS is that measurement's own.

A benchmark script calls itself with `CHILD_FLAG` and a JSON spec; the child runs
one measurement and prints one JSON record as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD_FLAG = "--child"


def child_args() -> argparse.Namespace | None:
    """The spec when this process is a child (`script --child JSON`), else None."""
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        return argparse.Namespace(**json.loads(sys.argv[2]))
    return None


def run_in_child(script: str, spec: dict, timeout: float) -> dict:
    """Run `script` as a child on `spec`: its last-line JSON record, or {"error": why}."""
    cmd = [sys.executable, os.path.abspath(script), CHILD_FLAG, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def script_main(
    doc: str, run_child, run_parent, add_arguments, *, model: str, region_size: int, region_size_help: str, timeout: float
) -> None:
    """A benchmark script's `main`: as a child, `run_child(spec)`; as the parent, parse the common flags
    (--model, --region-size, --timeout, --json) plus the script's own (`add_arguments(parser)`) and
    `run_parent(args)`."""
    child = child_args()
    if child is not None:
        run_child(child)
        return
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, help="registered model name")
    p.add_argument("--region-size", type=int, default=region_size, help=region_size_help)
    add_arguments(p)
    p.add_argument("--timeout", type=float, default=timeout, help="seconds allowed per configuration")
    p.add_argument("--json", default="", help="also write the results here")
    run_parent(p.parse_args())


def write_results(path: str, results: list) -> None:
    """The parent's records as JSON at `path` (nothing when path is empty)."""
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)
