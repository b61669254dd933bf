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
