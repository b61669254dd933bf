"""Benchmark: one DINO student step on CPU, views packed into one forward vs one forward per view.

The DINO shape (issue 8): 2 global views of ~8 regions and 6 local views of 2–3
regions, small regions (32 px by default), Region Fusion on, training mode with
drop path, forward + backward of a loss over every view's output (DINO's loss
couples all views, so separate forwards also share one backward).

- ``packed``:   ``model(regions, segments=..., generator=[g_0..g_7])`` — one call;
  unequal views go through the scan as one sequence with ``seq_idx``, equal
  views as a batch;
- ``separate``: ``model(regions[view], generator=g_v)`` for each view, the
  baseline (the thesis's way: views cannot be batched).

Each (backend, mode) runs in a fresh subprocess so that its peak RSS
(``ru_maxrss``) is its own; one untimed warm-up step (numba cache, allocator),
then the median of ``--steps`` timed steps. The script also checks that both
modes give the same loss (to float tolerance) before it reports anything.

    python bench/packing.py                                  # tiny model, 32 px, DINO views, numba + torch
    python bench/packing.py --views 4 4 4 4 4 4 4 4          # equal views: the batch path (B = 8)
    python bench/packing.py --model pixel_mamba_6m --backends numba
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CHILD_FLAG = "--child"
DINO_VIEWS = [8, 7, 2, 3, 2, 3, 2, 3]  # 2 global + 6 local views, regions per view


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(args: argparse.Namespace) -> None:
    """One (backend, mode): warm-up + timed steps in this process; prints one JSON line."""
    import torch

    from trainer.models import build_model
    from trainer.models.ssm import resolve_backend

    torch.manual_seed(0)
    model = build_model(
        args.model, region_size=args.region_size, ssm_backend=args.backend, region_fusion=True, num_classes=16
    ).train()
    r, views = args.region_size, args.views
    regions = torch.randint(0, 256, (sum(views), r, r, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    segments = torch.repeat_interleave(torch.arange(len(views)), torch.tensor(views))
    starts = [sum(views[:v]) for v in range(len(views) + 1)]

    def step(seed: int) -> float:
        gens = [torch.Generator().manual_seed(seed * 1000 + v) for v in range(len(views))]
        if args.mode == "packed":
            outputs = model(regions, segments=segments, generator=gens)
        else:
            outputs = [model(regions[starts[v] : starts[v + 1]], generator=g) for v, g in enumerate(gens)]
        # DINO-like: every view's logits enter one loss; spatial tokens keep the whole output in the graph
        loss = sum(o.logits.log_softmax(-1).mean() + o.spatial_tokens.mean() for o in outputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    loss0 = step(0)  # warm-up
    rss_after_warmup = _rss_mib()
    times = []
    for s in range(1, args.steps + 1):
        t0 = time.perf_counter()
        step(s)
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "mode": args.mode, "backend": resolve_backend(args.backend, "cpu"), "threads": torch.get_num_threads(),
        "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
        "peak_rss_mib": _rss_mib(), "rss_after_warmup_mib": rss_after_warmup, "loss0": loss0,
    }), flush=True)  # fmt: skip


def _run(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_parent(args: argparse.Namespace) -> None:
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"{args.model} at {args.region_size} px, views {args.views} ({sum(args.views)} regions), fusion on, "
        f"train mode, fwd+bwd, median of {args.steps} steps"
    )
    print(f"{'backend':>7} {'separate s':>11} {'packed s':>9} {'speed-up':>9} {'sep. peak RSS MiB':>18} {'packed peak RSS MiB':>20}")
    results = []
    for backend in args.backends:
        row = {}
        for mode in ("separate", "packed"):
            spec = {"model": args.model, "region_size": args.region_size, "views": args.views, "backend": backend,
                    "mode": mode, "steps": args.steps}  # fmt: skip
            row[mode] = _run(spec, args.timeout)
        results.append({"backend": backend, **row})
        bad = [m for m in row if "error" in row[m]]
        if bad:
            print(f"{backend:>7}  failed ({', '.join(bad)}):\n" + "\n".join(row[m]["error"] for m in bad))
            continue
        sep, pk = row["separate"], row["packed"]
        if abs(sep["loss0"] - pk["loss0"]) > 1e-4 * max(1.0, abs(sep["loss0"])):
            raise SystemExit(f"{backend}: packed loss {pk['loss0']} differs from separate {sep['loss0']}")
        print(
            f"{sep['backend']:>7} {sep['median_s']:11.3f} {pk['median_s']:9.3f} {sep['median_s'] / pk['median_s']:8.2f}× "
            f"{sep['peak_rss_mib']:18.0f} {pk['peak_rss_mib']:20.0f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        run_child(argparse.Namespace(**json.loads(sys.argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pixel_mamba_tiny", help="registered model name")
    p.add_argument("--region-size", type=int, default=32, help="region size in px (must suit the model's schedule)")
    p.add_argument("--views", type=int, nargs="+", default=DINO_VIEWS, help="regions per view")
    p.add_argument("--backends", nargs="+", default=["numba", "torch"], help="selective-scan backends to compare")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per configuration")
    p.add_argument("--json", default="", help="also write the results here")
    run_parent(p.parse_args())


if __name__ == "__main__":
    main()
