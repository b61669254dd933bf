"""Memory estimate: measured figures, interpolation, refusal with the ways out, warn-only where unmeasured."""

from __future__ import annotations

import pytest
import torch

from trainer.engine.memory import GiB, MemoryEstimateError, check_memory, find_figures, per_region_bytes

CPU = torch.device("cpu")


def check(**kwargs):
    base = dict(model_name="pixel_mamba_6m", device=CPU, amp="none", region_fusion=True, region_size=224,
                checkpoint_layers=0, regions_per_step=1000, available=12 * GiB)
    return check_memory(**(base | kwargs))


def test_whole_slides_of_the_default_model_are_refused_on_a_small_machine() -> None:
    with pytest.raises(MemoryEstimateError) as err:
        check()
    text = str(err.value)
    assert "1000 regions of 224 px" in text and "12.0 GiB available" in text
    assert "--precrop-regions" in text and "--checkpoint-layers" in text and "--force" in text
    assert "running anyway (--force)" in check(force=True)[0]


def test_the_tiny_recipe_fits() -> None:
    notes = check(model_name="pixel_mamba_tiny", region_size=32, regions_per_step=8)
    assert notes[0].startswith("memory: estimated peak 0.5 GiB")


def test_unmeasured_settings_only_warn() -> None:
    assert "no measured per-region figure for this setting" in check(amp="bf16", device=torch.device("meta"))[0]
    assert "with activation checkpointing" in check(checkpoint_layers=4)[0]


def test_interpolation_passes_through_the_measured_points() -> None:
    figures = find_figures("pixel_mamba_6m", "cpu", "fp32", False)
    for figure in figures:
        assert per_region_bytes(figures, figure.region_size) == pytest.approx(figure.bytes_per_region)
    a, b = per_region_bytes(figures, 64), per_region_bytes(figures, 96)
    assert a < b < per_region_bytes(figures, 128)
    assert per_region_bytes(figures, 256) == pytest.approx(4 * figures[-1].bytes_per_region)
