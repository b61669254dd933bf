"""Pixel-Mamba trainer: tile-store datasets, the model, objectives, the training engine."""

__version__ = "0.1.0"
