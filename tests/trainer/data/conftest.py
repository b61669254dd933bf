"""Fixtures: the SPECS store per codec, and a factory for custom stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_builders import REGION_SIZE, SPECS, SlideSpec, build_store


@pytest.fixture(scope="session")
def store_factory(tmp_path_factory: pytest.TempPathFactory):
    """build(specs, codec) → path of a fresh store in a session temp folder."""
    counter = iter(range(10**6))

    def build(specs: list[SlideSpec] = SPECS, codec: str = "none", size: int = REGION_SIZE) -> Path:
        root = tmp_path_factory.mktemp("stores")
        return build_store(root / f"store{next(counter)}-{codec}.zarr", specs, codec, size)

    return build


@pytest.fixture(scope="session")
def stores(store_factory) -> dict[str, Path]:
    """The SPECS store written once per codec."""
    return {codec: store_factory(SPECS, codec) for codec in ("none", "zstd", "jpeg")}
