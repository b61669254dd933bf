"""Pixel-Mamba: the network, its building blocks and the variant registry (no I/O)."""

from trainer.models.pixel_mamba import LayerSpec, PixelMamba, PixelMambaConfig, PixelMambaOutput
from trainer.models.registry import build_model, get_config, list_models, register_model

__all__ = [
    "LayerSpec",
    "PixelMamba",
    "PixelMambaConfig",
    "PixelMambaOutput",
    "build_model",
    "get_config",
    "list_models",
    "register_model",
]
