"""Serialization: regions in order, tokens row-major, the shared CLS token at ⌊h·w/2⌋ of each region."""

from __future__ import annotations

import pytest
import torch

from trainer.models.serialization import cls_index, deserialize, serialize

GRID = torch.tensor([[0.0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]).reshape(1, 4, 4, 1)
CLS = torch.tensor([[-7.0]])


def test_cls_sits_at_floor_half_of_the_region() -> None:
    seq = serialize(GRID, CLS)
    assert seq.shape == (1, 17, 1)
    assert seq[0, cls_index(4, 4), 0] == -7.0 and cls_index(4, 4) == 8
    assert torch.equal(torch.cat([seq[0, :8], seq[0, 9:]]).flatten(), GRID.flatten())
    assert cls_index(224, 224) == 25_088  # 25,088 pixels either side of the CLS token


def test_round_trip_with_several_regions_in_order() -> None:
    spatial = torch.arange(2 * 3 * 3 * 2, dtype=torch.float32).reshape(2, 3, 3, 2)
    cls = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    seq = serialize(spatial, cls)
    assert seq.shape == (1, 20, 2)
    assert torch.equal(seq[0, 4], cls[0]) and torch.equal(seq[0, 10 + 4], cls[1])  # ⌊9/2⌋ = 4
    assert torch.equal(seq[0, :4], spatial[0].reshape(9, 2)[:4])
    assert torch.equal(seq[0, 10:14], spatial[1].reshape(9, 2)[:4])
    back_spatial, back_cls = deserialize(seq, 2, 3, 3)
    assert torch.equal(back_spatial, spatial) and torch.equal(back_cls, cls)


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="cls must have shape"):
        serialize(GRID, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="does not hold 2 regions"):
        deserialize(torch.zeros(1, 17, 1), 2, 4, 4)
