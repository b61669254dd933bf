"""Memory estimate before training: will the largest step fit?

peak ≈ fixed + regions_per_step × bytes_per_region(R)

`bytes_per_region` is measured (bench/memory_per_region.py: the slope of one
training step's peak over the region count) per model, device type, precision
and Region Fusion setting, at a few region sizes R; between them it is
interpolated in log-log, above the largest it grows with the region's pixels
(× (R / R_max)², the exponent the measured figures approach at larger R). `regions_per_step` comes from
the objective (`Objective.regions_per_step`: LatentMIM's visible and target
regions, DINO's views) for the largest training slide after the region cap.
The estimate is compared with the memory available (free RAM from
/proc/meminfo's MemAvailable, or `torch.cuda.mem_get_info`); a step that would
not fit is refused with the ways out (`--precrop-regions`, `--checkpoint-layers`,
a tiny recipe; `--force` runs anyway). Where no figure was measured (another
device, precision, activation checkpointing) it only warns.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

GiB = 2**30
HEADROOM = 0.9  # refuse above this share of the available memory


class MemoryEstimateError(RuntimeError):
    """The largest training step is not expected to fit in memory."""


@dataclass(frozen=True, kw_only=True)
class RegionFigure:
    """One measured figure: peak bytes of a training step = fixed_bytes + n × bytes_per_region."""

    model: str
    device: str
    precision: str
    region_fusion: bool
    region_size: int
    bytes_per_region: float
    fixed_bytes: float


def _cpu(model: str, fusion: bool, region_size: int, per_region: float, fixed: float) -> RegionFigure:
    return RegionFigure(model=model, device="cpu", precision="fp32", region_fusion=fusion, region_size=region_size,
                        bytes_per_region=per_region, fixed_bytes=fixed)


# bench/memory_per_region.py on 2 shared CPU cores (torch 2.13 CPU, torch scan, fp32, one fwd+bwd);
# fixed_bytes is the whole process (torch itself included). No GPU figure has been measured yet.
MEASURED: tuple[RegionFigure, ...] = (
    _cpu("pixel_mamba_tiny", True, 32, 2.794e6, 5.371e8),
    _cpu("pixel_mamba_tiny", True, 64, 1.223e7, 5.276e8),
    _cpu("pixel_mamba_tiny", False, 32, 3.645e6, 5.325e8),
    _cpu("pixel_mamba_tiny", False, 64, 1.492e7, 5.322e8),
    _cpu("pixel_mamba_6m", True, 32, 5.728e6, 5.845e8),
    _cpu("pixel_mamba_6m", True, 128, 3.476e7, 6.722e8),
    _cpu("pixel_mamba_6m", False, 32, 8.509e6, 5.859e8),
    _cpu("pixel_mamba_6m", False, 64, 3.191e7, 5.871e8),
    _cpu("pixel_mamba_6m", False, 128, 1.341e8, 5.712e8),
)


def precision_of(amp: str, device: torch.device) -> str:
    """"fp32" | "bf16" | "fp16" as the loop will run (`trainer.engine.loop.resolve_amp`)."""
    from trainer.engine.loop import resolve_amp

    dtype = resolve_amp(amp, device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def find_figures(model: str, device: str, precision: str, region_fusion: bool) -> list[RegionFigure]:
    """The measured figures of one setting, by region size."""
    key = (model, device, precision, region_fusion)
    found = [f for f in MEASURED if (f.model, f.device, f.precision, f.region_fusion) == key]
    return sorted(found, key=lambda f: f.region_size)


def per_region_bytes(figures: list[RegionFigure], region_size: int) -> float:
    """bytes_per_region at `region_size`: log-log interpolation, ∝ R² beyond the measured range."""
    sizes = [f.region_size for f in figures]
    if region_size <= sizes[0] or len(figures) == 1:
        anchor = figures[0] if region_size <= sizes[0] else figures[-1]
        return anchor.bytes_per_region * (region_size / anchor.region_size) ** 2
    if region_size >= sizes[-1]:
        return figures[-1].bytes_per_region * (region_size / sizes[-1]) ** 2
    upper = next(i for i, s in enumerate(sizes) if s >= region_size)
    a, b = figures[upper - 1], figures[upper]
    slope = math.log(b.bytes_per_region / a.bytes_per_region) / math.log(b.region_size / a.region_size)
    return a.bytes_per_region * (region_size / a.region_size) ** slope


def estimate_bytes(figures: list[RegionFigure], *, regions: float, region_size: int) -> float:
    """Estimated peak bytes of a step over `regions` regions of `region_size` px."""
    fixed = max(f.fixed_bytes for f in figures)
    return fixed + regions * per_region_bytes(figures, region_size)


def available_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(
    *,
    model_name: str,
    device: torch.device,
    amp: str,
    region_fusion: bool,
    region_size: int,
    checkpoint_layers: int,
    regions_per_step: float,
    force: bool = False,
    available: int | None = None,
) -> list[str]:
    """Notes for the log; raises MemoryEstimateError when the step will not fit (unless `force`)."""
    precision = precision_of(amp, device)
    figures = find_figures(model_name, device.type, precision, region_fusion)
    what = f"{model_name} on {device.type} ({precision}, Region Fusion {'on' if region_fusion else 'off'})"
    if not figures or checkpoint_layers:
        reason = "with activation checkpointing" if figures else "for this setting"
        return [f"memory: no measured per-region figure {reason} ({what}); the largest step "
                f"({regions_per_step:g} regions) was not checked against the free memory"]
    need = estimate_bytes(figures, regions=regions_per_step, region_size=region_size)
    free = available_bytes(device) if available is None else int(available)
    summary = (f"estimated peak {need / GiB:.1f} GiB for the largest step ({regions_per_step:g} regions of "
               f"{region_size} px, {what}); {free / GiB:.1f} GiB available")
    if need <= HEADROOM * free:
        return [f"memory: {summary}"]
    if force:
        return [f"memory: {summary}; running anyway (--force)"]
    raise MemoryEstimateError(
        f"{summary}: it will not fit. Cap the regions per slide with --precrop-regions N, checkpoint "
        "activations with --checkpoint-layers K, use a smaller model or a tiny recipe (configs/demo_cpu.toml), "
        "or pass --force to try anyway"
    )
