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

Time: per backend, one subprocess runs one untimed warm-up step of each mode
(numba cache, allocator), then ``--steps`` rounds of one step of each mode,
alternating which goes first, so that both modes see the same machine load (the
shared CI cores are noisy); reported: the median step of each mode and the
median of the per-round ratios. Memory: each (backend, mode) runs one step in a
fresh subprocess, so that its peak RSS (``ru_maxrss``) is its own. The script
checks that both modes give the same loss (to float tolerance).

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
import time

from child_process import run_in_child, script_main, write_results

DINO_VIEWS = [8, 7, 2, 3, 2, 3, 2, 3]  # 2 global + 6 local views, regions per view
MODES = ("separate", "packed")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup(args: argparse.Namespace):
    """The model and a ``step(mode, seed) -> loss`` closure for one backend."""
    import torch

    from trainer.models import build_model

    torch.manual_seed(0)
    model = build_model(
        args.model, region_size=args.region_size, ssm_backend=args.backend, region_fusion=True, num_classes=16
    ).train()
    r, views = args.region_size, args.views
    regions = torch.randint(0, 256, (sum(views), r, r, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    segments = torch.repeat_interleave(torch.arange(len(views)), torch.tensor(views))
    starts = [sum(views[:v]) for v in range(len(views) + 1)]

    def step(mode: str, seed: int) -> float:
        gens = [torch.Generator().manual_seed(seed * 1000 + v) for v in range(len(views))]
        if mode == "packed":
            outputs = model(regions, segments=segments, generator=gens)
        else:
            outputs = [model(regions[starts[v] : starts[v + 1]], generator=g) for v, g in enumerate(gens)]
        # DINO-like: every view's logits enter one loss; spatial tokens keep the whole output in the graph
        loss = sum(o.logits.log_softmax(-1).mean() + o.spatial_tokens.mean() for o in outputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    return step


def run_child(args: argparse.Namespace) -> None:
    """``args.task`` "time": alternating timed steps of both modes; "memory": one step of ``args.mode``. One JSON line."""
    import torch

    from trainer.models.ssm import resolve_backend

    step = _setup(args)
    out = {"backend": resolve_backend(args.backend, "cpu"), "threads": torch.get_num_threads()}
    if args.task == "memory":
        out.update(mode=args.mode, loss0=step(args.mode, 0), peak_rss_mib=_rss_mib())
    else:
        losses = {mode: step(mode, 0) for mode in MODES}  # warm-up
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for s in range(1, args.steps + 1):
            for mode in MODES if s % 2 else MODES[::-1]:
                t0 = time.perf_counter()
                step(mode, s)
                times[mode].append(time.perf_counter() - t0)
        ratios = [a / b for a, b in zip(times["separate"], times["packed"])]
        out.update(times_s=times, losses=losses, median_s={m: statistics.median(t) for m, t in times.items()},
                   speedup=statistics.median(ratios))  # fmt: skip
    print(json.dumps(out), flush=True)


def run_parent(args: argparse.Namespace) -> None:
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"{args.model} at {args.region_size} px, views {args.views} ({sum(args.views)} regions), fusion on, "
        f"train mode, fwd+bwd, {args.steps} alternating rounds"
    )
    print(f"{'backend':>7} {'separate s':>11} {'packed s':>9} {'speed-up':>9} {'sep. peak RSS MiB':>18} {'packed peak RSS MiB':>20}")
    results = []
    for backend in args.backends:
        base = {"model": args.model, "region_size": args.region_size, "views": args.views, "backend": backend,
                "steps": args.steps}  # fmt: skip
        row = {"time": run_in_child(__file__, {**base, "task": "time"}, args.timeout)}
        for mode in MODES:
            row[mode] = run_in_child(__file__, {**base, "task": "memory", "mode": mode}, args.timeout)
        results.append({"backend": backend, **row})
        bad = [k for k in row if "error" in row[k]]
        if bad:
            print(f"{backend:>7}  failed ({', '.join(bad)}):\n" + "\n".join(row[k]["error"] for k in bad))
            continue
        sep, pk = row["separate"], row["packed"]
        if abs(sep["loss0"] - pk["loss0"]) > 1e-4 * max(1.0, abs(sep["loss0"])):
            raise SystemExit(f"{backend}: packed loss {pk['loss0']} differs from separate {sep['loss0']}")
        t = row["time"]
        print(
            f"{t['backend']:>7} {t['median_s']['separate']:11.3f} {t['median_s']['packed']:9.3f} {t['speedup']:8.2f}× "
            f"{sep['peak_rss_mib']:18.0f} {pk['peak_rss_mib']:20.0f}",
            flush=True,
        )
    write_results(args.json, results)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=int, nargs="+", default=DINO_VIEWS, help="regions per view")
    p.add_argument("--backends", nargs="+", default=["numba", "torch"], help="selective-scan backends to compare")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (one step of each mode per round, after one warm-up)")


def main() -> None:
    script_main(__doc__, run_child, run_parent, add_arguments, model='pixel_mamba_tiny', region_size=32,
                region_size_help="region size in px (must suit the model's schedule)", timeout=600.0)


if __name__ == "__main__":
    main()
