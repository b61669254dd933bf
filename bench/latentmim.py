"""Benchmark: one LatentMIM training step beside one supervised step on the same slides.

For each visible-region count v (default 4, 8, 16) a slide of n = v / (1 − mask_ratio)
regions is drawn (random uint8 pixels, grid coords on a 4-wide grid). The LatentMIM step
is the objective's real forward (student on v visible regions, no-grad EMA teacher on the
n − v targets, predictor, loss) plus backward; the supervised step is a forward +
backward of the same encoder (with a 2-class head) on all n regions, which is what
`pm-train supervised` does per slide. Every (objective, v) runs in a fresh subprocess
so its peak RSS (`ru_maxrss`) is its own; one untimed warm-up step, then the mean of
`--repeats` timed steps (wall time, and the process's CPU time, which a busy shared
machine disturbs less). Drop path is off (a dropped block would make the timing depend
on the draw). On CUDA, peak memory is `torch.cuda.max_memory_allocated`.

    python bench/latentmim.py                              # tiny model, 32-px regions, v = 4 8 16, CPU
    python bench/latentmim.py --visible 4 --repeats 1      # a quick look
    python bench/latentmim.py --model pixel_mamba_6m --region-size 224 --device cuda --amp bf16 \
        --predictor-width 512 --predictor-depth 3 --predictor-heads 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import time

from child_process import run_in_child, script_main, write_results


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(args: argparse.Namespace) -> None:
    """Run one (objective, visible count) configuration in this process; print one JSON line."""
    import torch

    from trainer.models import build_model
    from trainer.objectives.base import StepContext
    from trainer.objectives.latentmim import LatentMIMConfig, LatentMIMObjective, RegionMasking
    from trainer.objectives.latentmim_predictor import PredictorConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    n = round(args.visible / (1 - args.mask_ratio))
    overrides = {"drop_path_rate": 0.0, "region_size": args.region_size, "region_fusion": args.fusion == "on"}
    if args.objective == "supervised":
        module = build_model(args.model, num_classes=2, **overrides).to(device).train()
    else:
        predictor = PredictorConfig(width=args.predictor_width, depth=args.predictor_depth,
                                    heads=args.predictor_heads)  # fmt: skip
        encoder = build_model(args.model, **overrides)
        module = LatentMIMObjective(encoder, config=LatentMIMConfig(mask_ratio=args.mask_ratio,
                                                                    predictor=predictor)).to(device).train()
    gen = torch.Generator().manual_seed(1)
    r = args.region_size
    sample = {
        "regions": torch.randint(0, 256, (n, r, r, 3), generator=gen, dtype=torch.uint8).to(device),
        "coords": torch.stack([torch.arange(n) // 4, torch.arange(n) % 4], dim=1).to(device),
        "slide_id": "bench",
        "index": 0,
    }
    sample = RegionMasking(mask_ratio=args.mask_ratio)(sample, torch.Generator().manual_seed(2))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def step() -> float:
        ctx = StepContext(step=0, epoch=0, position=0, micro_step=0, accum_steps=1, device=device, values={},
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with autocast:
            if args.objective == "supervised":
                out = module(sample["regions"], generator=ctx.generator)
                loss = torch.nn.functional.cross_entropy(out.logits.float()[None], torch.tensor([1], device=device))
            else:
                loss = module(sample, step_ctx=ctx)["loss"]
        loss.backward()
        module.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up: kernels, numba's on-disk cache, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    print(json.dumps({
        "objective": args.objective, "visible": args.visible, "n": n, "step_s": sum(times) / len(times),
        "cpu_s": sum(cpu_times) / len(cpu_times),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib(),
        "loss": loss, "threads": torch.get_num_threads(),
    }), flush=True)  # fmt: skip


def run_parent(args: argparse.Namespace) -> None:
    memory = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"{args.model} at {args.region_size} px, fusion {args.fusion}, mask ratio {args.mask_ratio}, predictor "
        f"{args.predictor_depth}×{args.predictor_width} ({args.predictor_heads} heads), device {args.device}, "
        f"amp {args.amp}, mean of {args.repeats} step(s) after a warm-up"
    )
    print(f"{'visible':>7} {'n':>4} {'LatentMIM s':>12} {'supervised s':>13} {'ratio':>6} {'LatentMIM cpu s':>16} "
          f"{'supervised cpu s':>17} {'LatentMIM ' + memory:>24} {'supervised ' + memory:>25}")  # fmt: skip
    results = []
    for visible in args.visible:
        row = {}
        for objective in ("latentmim", "supervised"):
            spec = {k: v for k, v in vars(args).items() if k not in ("visible", "json", "timeout")}
            spec.update(objective=objective, visible=visible)
            row[objective] = run_in_child(__file__, spec, args.timeout)
        results.append({"visible": visible, **row})
        lm, sup = row["latentmim"], row["supervised"]
        if "error" in lm or "error" in sup:
            print(f"{visible:>7} failed: {lm.get('error', '')} {sup.get('error', '')}")
            continue
        ratio = lm["step_s"] / sup["step_s"]
        print(f"{visible:>7} {lm['n']:>4} {lm['step_s']:12.2f} {sup['step_s']:13.2f} {ratio:6.2f} "
              f"{lm['cpu_s']:16.2f} {sup['cpu_s']:17.2f} {lm['peak_mib']:24.0f} {sup['peak_mib']:25.0f}",
              flush=True)  # fmt: skip
    write_results(args.json, results)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--visible", type=int, nargs="+", default=[4, 8, 16], help="visible regions per slide")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of regions that are targets")
    p.add_argument("--fusion", choices=("on", "off"), default="on", help="Region Fusion")
    p.add_argument("--predictor-width", type=int, default=64, help="predictor width (the demo recipe's)")
    p.add_argument("--predictor-depth", type=int, default=2, help="predictor blocks")
    p.add_argument("--predictor-heads", type=int, default=4, help="predictor attention heads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")


def main() -> None:
    script_main(__doc__, run_child, run_parent, add_arguments, model='pixel_mamba_tiny', region_size=32,
                region_size_help='pixels per region side', timeout=600.0)


if __name__ == "__main__":
    main()
