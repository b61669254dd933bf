"""One DINO step (2 global + 6 local views): views run separately vs packed into one call.

Each mode runs in its own process (so its peak RSS is its own): views are drawn
for a synthetic slide of `--regions` regions on a grid, then `--repeats` timed
training steps (student on every view, teacher on the global views, backward)
after one warm-up step. "packed" needs a PixelMamba whose forward takes
`segments`; where the model lacks it the row says so.

    python bench/dino_views.py                        # pixel_mamba_tiny, 32-px regions, 40 regions
    python bench/dino_views.py --regions 110 --region-size 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_mode(args: argparse.Namespace) -> dict:
    import torch

    from trainer.models import build_model
    from trainer.objectives.base import StepContext
    from trainer.objectives.dino import DinoConfig, DinoObjective, supports_segments

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = build_model(args.model, region_size=args.region_size)
    if args.mode == "packed" and not supports_segments(encoder):
        return {"mode": "packed", "skipped": "PixelMamba.forward has no `segments` on this branch"}
    config = DinoConfig(out_dim=4096, pack_views=args.mode == "packed", views={"local_views": 6})
    objective = DinoObjective(encoder, config=config).train()
    cols = 10
    coords = torch.stack([torch.arange(args.regions) // cols, torch.arange(args.regions) % cols], dim=1)
    g = torch.Generator().manual_seed(0)
    sample = {
        "regions": torch.randint(0, 256, (args.regions, args.region_size, args.region_size, 3), generator=g,
                                 dtype=torch.uint8),
        "coords": coords, "index": 0, "slide_id": "bench",
    }  # fmt: skip
    sample = objective.sample_preparer()(sample, torch.Generator().manual_seed(1))
    times = []
    for i in range(args.repeats + 1):
        ctx = StepContext(step=0, epoch=1, position=0, micro_step=0, accum_steps=1, device=torch.device("cpu"),
                          values={"teacher_temp": 0.04}, generator=torch.Generator().manual_seed(2))  # fmt: skip
        start = time.perf_counter()
        objective(sample, step_ctx=ctx)["loss"].backward()
        objective.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return {
        "mode": args.mode,
        "view_regions": [len(v) for v in sample["views"]],
        "step_s": min(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pixel_mamba_tiny")
    parser.add_argument("--region-size", type=int, default=32)
    parser.add_argument("--regions", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["separate", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    rows = []
    for mode in ("separate", "packed"):
        command = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"# {args.model}, {args.regions} regions of {args.region_size} px, 2 + 6 views, {args.threads} thread(s)")
    print(f"views (regions each): {rows[0]['view_regions']}")
    print(f"{'mode':<10} {'step s':>8} {'peak RSS MiB':>13}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['mode']:<10} skipped: {row['skipped']}")
        else:
            print(f"{row['mode']:<10} {row['step_s']:>8.2f} {row['peak_rss_mib']:>13.0f}")


if __name__ == "__main__":
    main()
