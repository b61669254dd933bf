"""Token positions of Pixel-Mamba outputs and their 2-D sine-cosine embedding."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.models import build_model
from trainer.models.positions import sincos_embedding_2d, token_positions


def test_spatial_tokens_sit_at_their_centres_and_cls_at_the_region_centre() -> None:
    coords = torch.tensor([[0, 0], [2, 5]])
    pos = token_positions(coords, torch.tensor([0, 1]), (3, 4))
    assert pos.spatial.shape == (2, 3, 4, 2) and pos.cls.shape == (2, 2)
    for region, (r, c) in enumerate(coords.tolist()):
        for i in range(3):
            for j in range(4):
                assert pos.spatial[region, i, j].tolist() == [r * 3 + i + 0.5, c * 4 + j + 0.5]
        assert pos.cls[region].tolist() == [r * 3 + 1.5, c * 4 + 2.0]
        assert torch.allclose(pos.spatial[region].reshape(-1, 2).mean(0), pos.cls[region])  # centre of its tokens


def test_the_same_grid_cell_and_token_give_the_same_vector_in_any_call() -> None:
    """Region (4, 1) is input 0 of one call and input 2 of another: its tokens embed identically."""
    first = token_positions(torch.tensor([[4, 1], [0, 0]]), torch.tensor([0, 1]), (2, 2))
    second = token_positions(torch.tensor([[9, 9], [3, 3], [4, 1]]), torch.tensor([2, 0]), (2, 2))
    a = sincos_embedding_2d(first.spatial[0], 64)
    b = sincos_embedding_2d(second.spatial[0], 64)
    assert torch.equal(a, b)
    assert torch.equal(sincos_embedding_2d(first.cls[0], 64), sincos_embedding_2d(second.cls[0], 64))
    flat = a.reshape(-1, 64)  # the four tokens of one region are four different vectors
    assert torch.cdist(flat, flat).add(torch.eye(4)).min() > 1e-3


def test_after_fusion_each_survivor_takes_its_representative_regions_position() -> None:
    torch.manual_seed(0)
    model = build_model("pixel_mamba_tiny", region_size=16).eval()
    n = 10
    coords = torch.stack([torch.arange(n) // 5, (torch.arange(n) * 3) % 5], dim=1)
    out = model(torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8))
    m = out.region_ids.numel()
    assert m < n  # Region Fusion merged regions
    h, w = out.spatial_tokens.shape[1:3]
    pos = token_positions(coords, out.region_ids, (h, w))
    assert pos.spatial.shape == (m, h, w, 2)
    for k, rid in enumerate(out.region_ids.tolist()):
        r, c = coords[rid].tolist()
        assert pos.cls[k].tolist() == [r * h + h / 2, c * w + w / 2]
        assert pos.spatial[k, 0, 0].tolist() == [r * h + 0.5, c * w + 0.5]
    # every input region's survivor is one whose representative is itself or a region merged with it
    assert set(out.assignment.tolist()) == set(range(m))
    assert all(out.assignment[rid] == k for k, rid in enumerate(out.region_ids.tolist()))


def test_sincos_layout_and_values() -> None:
    dim = 16
    quarter = dim // 4
    pos = torch.tensor([[0.0, 0.0], [1.5, -2.0]])
    emb = sincos_embedding_2d(pos, dim)
    assert emb.shape == (2, dim) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([0.0] * quarter + [1.0] * quarter + [0.0] * quarter + [1.0] * quarter))
    omega = [10000 ** (-k / quarter) for k in range(quarter)]
    expected = (
        [math.sin(1.5 * o) for o in omega] + [math.cos(1.5 * o) for o in omega]
        + [math.sin(-2.0 * o) for o in omega] + [math.cos(-2.0 * o) for o in omega]
    )  # fmt: skip
    assert emb[1].tolist() == pytest.approx(expected, abs=1e-6)
    # rows and columns are not interchangeable
    swapped = sincos_embedding_2d(torch.tensor([2.0, 1.0]), dim)
    assert not torch.allclose(sincos_embedding_2d(torch.tensor([1.0, 2.0]), dim), swapped)
    assert sincos_embedding_2d(torch.zeros(3, 5, 2), 8).shape == (3, 5, 8)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_embedding_2d(torch.zeros(2, 2), 10)
    with pytest.raises(ValueError, match=r"\(row, col\)"):
        sincos_embedding_2d(torch.zeros(2, 3), 8)
    with pytest.raises(ValueError, match="must index the 2 regions"):
        token_positions(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 2]), (2, 2))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        token_positions(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0]), (2, 2))
