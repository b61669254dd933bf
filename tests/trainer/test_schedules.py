"""Per-iteration cosine schedules with linear warm-up: values at known steps."""

from __future__ import annotations

import math

import pytest

from trainer.schedules import CosineSchedule, cosine_from_epochs


def test_warmup_then_cosine_values_at_known_steps() -> None:
    s = CosineSchedule(base=1.0, final=0.0, total_steps=110, warmup_steps=10, warmup_start=0.0)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # half-way through the cosine
    assert s(10 + 25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(0.0)
    assert s(500) == pytest.approx(0.0)  # held after the end


def test_increasing_schedule_for_ema_momentum() -> None:
    s = CosineSchedule(base=0.996, final=1.0, total_steps=100)
    values = [s(i) for i in range(101)]
    assert values[0] == pytest.approx(0.996)
    assert values[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_constant_when_base_equals_final() -> None:
    s = CosineSchedule(base=5e-4, final=5e-4, total_steps=7)
    assert {s(i) for i in range(10)} == {5e-4}


def test_from_epochs_caps_warmup_and_converts_lengths() -> None:
    s = cosine_from_epochs(base=1.0, final=0.1, epochs=2, steps_per_epoch=3, warmup_epochs=5)
    assert (s.total_steps, s.warmup_steps) == (6, 6)
    s = cosine_from_epochs(base=1.0, final=0.1, epochs=10, steps_per_epoch=4, warmup_epochs=0.5)
    assert (s.total_steps, s.warmup_steps) == (40, 2)


@pytest.mark.parametrize("kwargs", [dict(total_steps=0), dict(total_steps=5, warmup_steps=6)])
def test_bad_lengths_rejected(kwargs) -> None:
    with pytest.raises(ValueError):
        CosineSchedule(base=1.0, final=0.0, **kwargs)
