"""Offline tiling pipeline: manifest -> tissue -> region grid -> Zarr tile store."""

__version__ = "0.1.0"
