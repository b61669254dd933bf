"""Region cap: a connected neighbourhood of N regions grown by grid distance, across fragments; read only what is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from store_builders import SlideSpec

from trainer.data import tile_dataset
from trainer.data.precrop import precrop_indices
from trainer.data.tile_dataset import TileStoreDataset


def two_fragments() -> np.ndarray:
    """A 10×10 block of tissue and, 5 columns to its right, a 5×5 block: 125 regions, row-major."""
    big = [(r, c) for r in range(10) for c in range(10)]
    small = [(r, c) for r in range(5) for c in range(15, 20)]
    return np.array(sorted(big + small), dtype=np.int64)


def connected(cells: np.ndarray) -> bool:
    """8-connectivity of a set of grid cells."""
    cells = {tuple(c) for c in cells.tolist()}
    todo, seen = [next(iter(cells))], set()
    while todo:
        r, c = todo.pop()
        if (r, c) in seen:
            continue
        seen.add((r, c))
        todo += [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (r + dr, c + dc) in cells]
    return seen == cells


def test_small_slides_are_kept_whole_without_drawing() -> None:
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert precrop_indices(np.zeros((5, 2)), 5, generator).tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="must be >= 1"):
        precrop_indices(np.zeros((5, 2)), 0, generator)


def test_cap_is_a_connected_neighbourhood_inside_a_fragment() -> None:
    coords = two_fragments()
    for seed in range(12):
        keep = precrop_indices(coords, 20, torch.Generator().manual_seed(seed))
        assert len(keep) == 20 and np.all(np.diff(keep) > 0)  # ascending: row-major order kept
        assert connected(coords[keep])
        in_big = coords[keep][:, 1] < 10
        assert in_big.all() or (~in_big).all()  # 20 regions fit in either fragment: no jump needed


def test_cap_grows_across_fragments_once_one_is_used_up() -> None:
    coords = two_fragments()
    for seed in range(12):
        keep = precrop_indices(coords, 110, torch.Generator().manual_seed(seed))
        cells = coords[keep]
        if (cells[:, 1] >= 15).sum() == 25:  # started in the small fragment: all of it, then 85 of the big one
            assert (cells[:, 1] < 10).sum() == 85
        else:  # started in the big fragment: all 100, then the 10 nearest of the small one
            assert (cells[:, 1] < 10).sum() == 100
            assert connected(cells[cells[:, 1] >= 15])


def test_cap_is_a_function_of_the_generator() -> None:
    coords = two_fragments()
    draw = [precrop_indices(coords, 30, torch.Generator().manual_seed(s)).tolist() for s in (1, 1, 2)]
    assert draw[0] == draw[1] and draw[0] != draw[2]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_dataset_reads_only_the_kept_regions(store_factory, monkeypatch, codec) -> None:
    store = store_factory([SlideSpec(slide_id="big", n=20, split="train")], codec)
    dataset = TileStoreDataset(store)
    full = dataset[0]
    calls = []
    monkeypatch.setattr(tile_dataset, "regions_tensor", lambda regions: calls.append(1))  # the whole-slide read
    keep = np.array([1, 5, 6, 19])
    capped = dataset.read(0, select=lambda coords: keep)
    assert not calls
    assert torch.equal(capped["regions"], full["regions"][keep]) and torch.equal(capped["coords"], full["coords"][keep])
