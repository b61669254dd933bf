"""Peak memory of one training step per region: the figures behind `trainer.engine.memory`.

For each (model, region size, Region Fusion) it runs a fresh process per region
count n, doing one forward + backward of the supervised head on n random regions
(fp32 on CPU; on CUDA also bf16 autocast), and reads the peak (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on CUDA). The slope over n is the per-region figure,
the intercept the fixed cost. Prints a table and the `RegionFigure(...)` lines.

    python bench/memory_per_region.py                 # CPU figures (a minute or two)
    python bench/memory_per_region.py --device cuda   # GPU figures (fp32 and bf16)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = (  # model, region size, region counts
    ("pixel_mamba_tiny", 32, (8, 32)),
    ("pixel_mamba_6m", 32, (4, 16)),
)


def one_step(model_name: str, region_size: int, n: int, fusion: bool, device: str, precision: str) -> float:
    """Peak bytes of one fwd+bwd step on n regions (run in a fresh process)."""
    import resource

    import torch

    from trainer.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(model_name, num_classes=2, region_size=region_size, region_fusion=fusion).to(device)
    regions = torch.randint(0, 255, (n, region_size, region_size, 3), dtype=torch.uint8, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
        out = model(regions, generator=torch.Generator().manual_seed(0))
    out.logits.float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure(model_name: str, region_size: int, n: int, fusion: bool, device: str, precision: str) -> float:
    code = (
        "import json,sys; sys.path.insert(0, '.'); from bench.memory_per_region import one_step; "
        f"print(json.dumps(one_step({model_name!r}, {region_size}, {n}, {fusion}, {device!r}, {precision!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    precisions = ("fp32",) if args.device == "cpu" else ("fp32", "bf16")
    print("| model | R | fusion | precision | n | peak MiB | per region MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    lines = []
    for model_name, region_size, (small, large) in CASES:
        for fusion in (True, False):
            for precision in precisions:
                a = measure(model_name, region_size, small, fusion, args.device, precision)
                b = measure(model_name, region_size, large, fusion, args.device, precision)
                slope = max((b - a) / (large - small), 0.0)
                fixed = max(a - slope * small, 0.0)
                for n, peak in ((small, a), (large, b)):
                    print(f"| {model_name} | {region_size} | {fusion} | {precision} | {n} | {peak / 2**20:.1f} | "
                          f"{slope / 2**20:.2f} |")
                lines.append(
                    f"    RegionFigure(model={model_name!r}, device={args.device!r}, precision={precision!r}, "
                    f"region_fusion={fusion}, region_size={region_size}, bytes_per_region={slope:.4g}, "
                    f"fixed_bytes={fixed:.4g}),"
                )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
