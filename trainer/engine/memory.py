"""Memory estimate before training: will the largest step fit?

peak ≈ fixed + regions_per_step × bytes_per_region × (R / R_measured)²

`bytes_per_region` is measured (bench/memory_per_region.py: the slope of one
training step's peak over the region count) per model, device type, precision
and Region Fusion setting; activations grow with a region's pixels, hence the
(R / R_measured)² scaling to other region sizes. `regions_per_step` comes from
the objective (`Objective.regions_per_step`: LatentMIM's visible and target
regions, DINO's views) for the largest training slide after the region cap.
The estimate is compared with the memory available (free RAM from
/proc/meminfo's MemAvailable, or `torch.cuda.mem_get_info`); a step that would
not fit is refused with the ways out (`--precrop-regions`, `--checkpoint-layers`,
a tiny recipe; `--force` runs anyway). Where no figure was measured (another
device, precision, activation checkpointing) it only warns.
"""

from __future__ import annotations

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


# bench/memory_per_region.py on 2 shared CPU cores (torch 2.13 CPU, fp32, one thread, one fwd+bwd)
MEASURED: tuple[RegionFigure, ...] = ()


def precision_of(amp: str, device: torch.device) -> str:
    """"fp32" | "bf16" | "fp16" as the loop will run (`trainer.engine.loop.resolve_amp`)."""
    from trainer.engine.loop import resolve_amp

    dtype = resolve_amp(amp, device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def find_figure(model: str, device: str, precision: str, region_fusion: bool) -> RegionFigure | None:
    for figure in MEASURED:
        if (figure.model, figure.device, figure.precision, figure.region_fusion) == (
            model, device, precision, region_fusion
        ):
            return figure
    return None


def estimate_bytes(figure: RegionFigure, *, regions: float, region_size: int) -> float:
    """Estimated peak bytes of a step over `regions` regions of `region_size` px."""
    return figure.fixed_bytes + regions * figure.bytes_per_region * (region_size / figure.region_size) ** 2


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
    figure = find_figure(model_name, device.type, precision, region_fusion)
    what = f"{model_name} on {device.type} ({precision}, Region Fusion {'on' if region_fusion else 'off'})"
    if figure is None or checkpoint_layers:
        reason = "with activation checkpointing" if figure is not None else "for this setting"
        return [f"memory: no measured per-region figure {reason} ({what}); the largest step "
                f"({regions_per_step:g} regions) was not checked against the free memory"]
    need = estimate_bytes(figure, regions=regions_per_step, region_size=region_size)
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
