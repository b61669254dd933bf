"""Named Pixel-Mamba variants: ``build_model(name, **overrides)``, ``list_models()``, ``register_model``.

A variant is a function returning a :class:`PixelMambaConfig`; ``build_model``
applies keyword overrides to that config (any ``PixelMambaConfig`` field, e.g.
``num_classes``, ``ssm_backend``, ``region_fusion``, ``checkpoint_layers``,
``region_size``) and builds the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from trainer.models.pixel_mamba import PIXEL_MAMBA_6M_SCHEDULE, PixelMamba, PixelMambaConfig, parse_schedule

ConfigFactory = Callable[[], PixelMambaConfig]
_REGISTRY: dict[str, ConfigFactory] = {}


def register_model(name: str) -> Callable[[ConfigFactory], ConfigFactory]:
    """Decorator: register a zero-argument function returning a PixelMambaConfig under ``name``."""

    def decorate(factory: ConfigFactory) -> ConfigFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """Registered variant names, sorted."""
    return sorted(_REGISTRY)


def get_config(name: str, **overrides: Any) -> PixelMambaConfig:
    """The named variant's config with ``overrides`` applied (validated by the config)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    config = _REGISTRY[name]()
    fields = {f.name for f in dataclasses.fields(PixelMambaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown PixelMambaConfig field(s) {unknown} for model {name!r}; valid: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def build_model(name: str, **overrides: Any) -> PixelMamba:
    """Build the named variant, e.g. ``build_model("pixel_mamba_6m", num_classes=6)``."""
    return PixelMamba(get_config(name, **overrides))


@register_model("pixel_mamba_6m")
def _pixel_mamba_6m() -> PixelMambaConfig:
    """Table A.1: 24 layers, 224-px regions, tokens 1×1 → 32×32 px, channels 3 → 384."""
    return PixelMambaConfig(region_size=224, layers=parse_schedule(PIXEL_MAMBA_6M_SCHEDULE))


@register_model("pixel_mamba_tiny")
def _pixel_mamba_tiny() -> PixelMambaConfig:
    """Test-sized: 32-px regions, 6 layers, tokens 1×1 → 4×4 px (8×8 grid), channels 3 → 24."""
    return PixelMambaConfig(
        region_size=32,
        layers=parse_schedule(("H-Cat", "V-Cat", "H-Avg", "V-Cat", "-", "-")),
        drop_path_rate=0.1,
    )
