"""Per-iteration schedules: linear warm-up, then a half-cosine from `base` to `final`.

Every schedule is a pure function of the optimizer step, so a resumed run
recomputes the same values from the restored step and no schedule state needs
saving. The engine uses them for the learning rate and weight decay; objectives
use the same class for EMA momentum (0.996 → 1) and teacher temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CosineSchedule:
    """value(step) for step = 0, 1, ... (optimizer steps).

    Warm-up: `warmup_start` at step 0, rising linearly towards `base`, reached at
    `warmup_steps`. Then a half-cosine from `base` to `final`, reached at
    `total_steps` (and held after it). `base == final` gives a constant after warm-up.
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in 0..total_steps ({self.total_steps}), got {self.warmup_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span == 0 else min(1.0, (step - self.warmup_steps) / span)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))


def cosine_from_epochs(
    *,
    base: float,
    final: float,
    epochs: float,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.0,
) -> CosineSchedule:
    """A `CosineSchedule` whose lengths are given in (possibly fractional) epochs.

    Warm-up is capped at the schedule's length, so a recipe's 5 warm-up epochs
    still make a valid schedule in a 2-epoch smoke run.
    """
    total = max(1, round(epochs * steps_per_epoch))
    warmup = min(total, round(warmup_epochs * steps_per_epoch))
    return CosineSchedule(base=base, final=final, total_steps=total, warmup_steps=warmup, warmup_start=warmup_start)
