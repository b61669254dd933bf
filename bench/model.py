"""Benchmark: Pixel-Mamba forward + backward on CPU, seconds per region and peak RSS.

Each (regions, fusion) configuration runs in a fresh subprocess so that its peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. One timed
forward + backward per configuration after a tiny scan call that loads the
kernels (numba's on-disk cache). Training mode, drop path off (a dropped block would
make the timing depend on the draw), random uint8 pixels.

    python bench/model.py                              # pixel_mamba_6m, 224 px, n = 1 2 4 8, fusion off then on
    python bench/model.py --regions 1 2 --fusion off   # a subset
    python bench/model.py --model pixel_mamba_tiny --region-size 32   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

from child_process import run_in_child, script_main, write_results


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _warm_up_scan(backend: str) -> None:
    """Load the scan kernels (numba's on-disk cache) outside the timed region."""
    import torch

    from trainer.models.ssm import selective_scan_fn

    u = torch.randn(1, 4, 64, requires_grad=True)
    y = selective_scan_fn(u, torch.rand(1, 4, 64), -torch.rand(4, 16), torch.randn(1, 16, 64), torch.randn(1, 16, 64),
                          D=torch.ones(4), z=torch.randn(1, 4, 64), delta_softplus=True, backend=backend)  # fmt: skip
    y.sum().backward()


def run_child(args: argparse.Namespace) -> None:
    """Run one configuration in this process and print one JSON line."""
    import torch

    from trainer.models import build_model
    from trainer.models.ssm import resolve_backend

    _warm_up_scan(args.backend)
    torch.manual_seed(0)
    overrides = {
        "ssm_backend": args.backend,
        "region_fusion": args.fusion == "on",
        "drop_path_rate": 0.0,
        "num_classes": 2,
        "checkpoint_layers": args.checkpoint_layers,
    }
    if args.region_size:
        overrides["region_size"] = args.region_size
    model = build_model(args.model, **overrides).train()
    r = model.config.region_size
    regions = torch.randint(0, 256, (args.n, r, r, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    out = model(regions, generator=torch.Generator().manual_seed(2))
    t1 = time.perf_counter()
    (out.logits.logsumexp(0) + out.spatial_tokens.mean()).backward()
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "model": args.model,
                "region_size": r,
                "n": args.n,
                "fusion": args.fusion,
                "backend": resolve_backend(args.backend, "cpu"),
                "threads": torch.get_num_threads(),
                "checkpoint_layers": args.checkpoint_layers,
                "forward_s": t1 - t0,
                "backward_s": t2 - t1,
                "total_s": t2 - t0,
                "s_per_region": (t2 - t0) / args.n,
                "rss_before_mib": rss_before,
                "peak_rss_mib": _rss_mib(),
                "survivors": int(out.cls_tokens.shape[0]),
            }
        ),
        flush=True,
    )


def run_parent(args: argparse.Namespace) -> None:
    results = []
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"model {args.model}, checkpoint_layers {args.checkpoint_layers}"
    )
    header = f"{'fusion':>6} {'n':>3} {'backend':>7} {'fwd s':>8} {'bwd s':>8} {'s/region':>9} {'peak RSS MiB':>13} {'Δ RSS MiB':>10} {'survivors':>9}"
    print(header)
    for fusion in args.fusion_modes:
        for n in args.regions:
            spec = {"model": args.model, "n": n, "fusion": fusion, "backend": args.backend, "region_size": args.region_size,
                    "checkpoint_layers": args.checkpoint_layers}  # fmt: skip
            rec = run_in_child(__file__, spec, args.timeout)
            if "error" in rec:
                print(f"{fusion:>6} {n:>3}  failed: {rec['error']}")
                results.append({"n": n, "fusion": fusion, **rec})
                continue
            results.append(rec)
            print(
                f"{fusion:>6} {n:>3} {rec['backend']:>7} {rec['forward_s']:8.2f} {rec['backward_s']:8.2f} "
                f"{rec['s_per_region']:9.2f} {rec['peak_rss_mib']:13.0f} {rec['peak_rss_mib'] - rec['rss_before_mib']:10.0f} "
                f"{rec['survivors']:9d}",
                flush=True,
            )
    ok = [r for r in results if "peak_rss_mib" in r and r["fusion"] == "off"]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (b["n"] - a["n"])
        print(f"# fusion off: peak RSS grows {slope:.0f} MiB per region between n={a['n']} and n={b['n']}")
    write_results(args.json, results)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="selective-scan backend (auto picks numba on CPU when it works)")
    p.add_argument("--regions", type=int, nargs="+", default=[1, 2, 4, 8], help="region counts to run")
    p.add_argument("--fusion", dest="fusion_modes", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--checkpoint-layers", type=int, default=0, help="activation-checkpoint the first k layers")


def main() -> None:
    script_main(__doc__, run_child, run_parent, add_arguments, model='pixel_mamba_6m', region_size=0,
                region_size_help="override the variant's region size (0 = keep)", timeout=900.0)


if __name__ == "__main__":
    main()
