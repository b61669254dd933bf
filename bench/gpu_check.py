"""GPU check: Pixel-Mamba forward/backward time and peak GPU memory with Region Fusion on.

For a machine with a CUDA GPU. For each selective-scan backend that can run
(``torch`` always; ``cuda`` = mamba-ssm's fused kernel when it imports) and each
region count (default 32, 128, 512 regions of 224 px): one warm-up step on 2
regions, then one timed training-mode forward + backward under bf16 autocast,
peak memory from ``torch.cuda.max_memory_allocated``. Larger counts are skipped
once a step exceeds ``--max-step-s``; an out-of-memory step is reported as OOM.

    python bench/gpu_check.py                       # pixel_mamba_6m, 32 128 512 regions
    python bench/gpu_check.py --checkpoint-layers 8 --regions 512
    python bench/gpu_check.py --dry-run             # CPU, pixel_mamba_tiny, 2 and 4 regions: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from trainer.models import build_model
from trainer.models.ssm import resolve_backend


def available_backends(device: torch.device) -> list[str]:
    names = ["torch"]
    try:
        resolve_backend("cuda", device)
        names.append("cuda")
    except Exception as exc:  # BackendUnavailableError: no mamba-ssm build, or not on CUDA
        print(f"# cuda backend unavailable: {exc}")
    return names


def step(model, n: int, device: torch.device, generator: torch.Generator, use_autocast: bool) -> dict:
    """One forward + backward on n random regions; times in s, peak memory in GiB (CUDA only)."""
    r = model.config.region_size
    regions = torch.randint(0, 256, (n, r, r, 3), dtype=torch.uint8, device=device)
    model.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    t0 = time.perf_counter()
    with amp:
        out = model(regions, generator=generator)
        loss = out.logits.float().logsumexp(0) + out.spatial_tokens.float().mean()
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return {
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "survivors": int(out.cls_tokens.shape[0]),
        "finite": bool(finite),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pixel_mamba_6m")
    p.add_argument("--regions", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--checkpoint-layers", type=int, default=0)
    p.add_argument("--max-step-s", type=float, default=120.0, help="skip larger region counts after a step this slow")
    p.add_argument("--dry-run", action="store_true", help="CPU, pixel_mamba_tiny, 2 and 4 regions: checks the script runs")
    args = p.parse_args()

    if args.dry_run:
        device, model_name, counts, use_autocast = torch.device("cpu"), "pixel_mamba_tiny", [2, 4], False
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or use --dry-run to check the script on CPU")
        device, model_name, counts, use_autocast = torch.device("cuda"), args.model, args.regions, True
    print(f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    backends = available_backends(device)
    print(f"{'backend':>7} {'n':>5} {'fwd s':>8} {'bwd s':>8} {'peak GiB':>9} {'survivors':>9} {'finite':>6}")
    for backend in backends:
        torch.manual_seed(0)
        model = build_model(
            model_name, num_classes=2, region_fusion=True, ssm_backend=backend, checkpoint_layers=args.checkpoint_layers
        ).to(device).train()
        generator = torch.Generator(device=device).manual_seed(0)
        step(model, 2, device, generator, use_autocast)  # warm-up: kernel loads, allocator
        for n in counts:
            try:
                rec = step(model, n, device, generator, use_autocast)
            except torch.cuda.OutOfMemoryError:
                print(f"{backend:>7} {n:>5}  OOM")
                torch.cuda.empty_cache()
                break
            print(
                f"{backend:>7} {n:>5} {rec['forward_s']:8.2f} {rec['backward_s']:8.2f} {rec['peak_gib']:9.2f} "
                f"{rec['survivors']:9d} {str(rec['finite']):>6}",
                flush=True,
            )
            if rec["forward_s"] + rec["backward_s"] > args.max_step_s:
                print(f"# {backend}: step over {args.max_step_s} s, skipping larger region counts")
                break


if __name__ == "__main__":
    main()
