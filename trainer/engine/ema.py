"""EMA teachers: teacher = m·teacher + (1−m)·student after every optimizer step that was not skipped.

One helper for every teacher–student objective (LatentMIM, DINO). The objective
lists its pairs (`Objective.ema_pairs()`) and a schedule named "ema_momentum";
the engine checks the pairs once (`check_ema_pairs`) and calls `ema_update`
with the schedule's value at the step just taken. Floating-point parameters and
buffers are averaged; integer buffers (counters) are copied from the student.
Non-persistent buffers (constants such as PixelMamba's pixel_mean / pixel_std)
are left alone: the checkpoint does not hold them, so averaging them (m·x + (1−m)·x
is not always x in floating point) would give the teacher a state a resume cannot
restore.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

MOMENTUM = "ema_momentum"


class EMAPairError(ValueError):
    """An objective's (teacher, student) pair cannot be EMA-updated."""


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and the buffers the state_dict holds (non-persistent buffers left out)."""
    return list(module.state_dict(keep_vars=True).items())


def check_ema_pairs(pairs: Iterable[tuple[nn.Module, nn.Module]], optimised: set[int]) -> None:
    """Refuse pairs whose names or shapes differ, whose teacher wants gradients or is optimised.

    optimised: ids of the parameters the optimizer holds.
    """
    for i, (teacher, student) in enumerate(pairs):
        t, s = _tensors(teacher), _tensors(student)
        if [n for n, _ in t] != [n for n, _ in s]:
            only = sorted({n for n, _ in t} ^ {n for n, _ in s})[:5]
            raise EMAPairError(f"EMA pair {i}: teacher and student tensors differ by name ({only})")
        for (name, a), (_, b) in zip(t, s):
            if a.shape != b.shape:
                raise EMAPairError(
                    f"EMA pair {i}: {name} is {tuple(a.shape)} in the teacher, {tuple(b.shape)} in the student"
                )
        wants_grad = [n for n, p in teacher.named_parameters() if p.requires_grad]
        if wants_grad:
            raise EMAPairError(
                f"EMA pair {i}: teacher parameters require gradients ({wants_grad[:3]}); build it with make_teacher"
            )
        if any(id(p) in optimised for p in teacher.parameters()):
            raise EMAPairError(f"EMA pair {i}: teacher parameters are in the optimizer")


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """teacher = momentum·teacher + (1 − momentum)·student, in place, for every pair."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    for teacher, student in pairs:
        floats_t, floats_s = [], []
        for (_, t), (_, s) in zip(_tensors(teacher), _tensors(student)):
            if t.is_floating_point():
                floats_t.append(t)
                floats_s.append(s.detach().to(t.dtype))
            else:
                t.copy_(s)
        if floats_t:
            torch._foreach_mul_(floats_t, momentum)
            torch._foreach_add_(floats_t, floats_s, alpha=1.0 - momentum)
