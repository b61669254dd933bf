"""Token Expansion on a hand-made 4×4 grid: exact outputs, CLS handling and re-insertion position."""

from __future__ import annotations

import pytest
import torch

from trainer.models.serialization import cls_index, serialize
from trainer.models.token_expansion import TokenExpansion, expand_tokens

# One region, one channel: token (r, c) holds 10·r + c.
GRID = torch.tensor([[0.0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]).reshape(1, 4, 4, 1)
CLS = torch.tensor([[-7.0]])


def test_horizontal_concatenation_pairs_columns_first_then_second() -> None:
    out, cls = expand_tokens(GRID, CLS, direction="h", merge="cat")
    expected = torch.tensor(
        [
            [[0.0, 1], [2, 3]],
            [[10, 11], [12, 13]],
            [[20, 21], [22, 23]],
            [[30, 31], [32, 33]],
        ]
    ).reshape(1, 4, 2, 2)
    assert torch.equal(out, expected)
    assert torch.equal(cls, torch.tensor([[-7.0, -7.0]]))


def test_vertical_concatenation_pairs_rows_first_then_second() -> None:
    out, cls = expand_tokens(GRID, CLS, direction="v", merge="cat")
    expected = torch.tensor(
        [
            [[0.0, 10], [1, 11], [2, 12], [3, 13]],
            [[20, 30], [21, 31], [22, 32], [23, 33]],
        ]
    ).reshape(1, 2, 4, 2)
    assert torch.equal(out, expected)
    assert torch.equal(cls, torch.tensor([[-7.0, -7.0]]))


def test_horizontal_and_vertical_average() -> None:
    out_h, cls_h = expand_tokens(GRID, CLS, direction="h", merge="avg")
    assert torch.equal(out_h[..., 0], torch.tensor([[[0.5, 2.5], [10.5, 12.5], [20.5, 22.5], [30.5, 32.5]]]))
    out_v, cls_v = expand_tokens(GRID, CLS, direction="v", merge="avg")
    assert torch.equal(out_v[..., 0], torch.tensor([[[5.0, 6, 7, 8], [25, 26, 27, 28]]]))
    assert torch.equal(cls_h, CLS) and torch.equal(cls_v, CLS)


def test_concatenation_keeps_channel_blocks_of_multichannel_tokens() -> None:
    grid = torch.stack([GRID[..., 0], 100 + GRID[..., 0]], dim=-1)  # (1, 4, 4, 2)
    cls = torch.tensor([[1.0, 2.0]])
    out, cls_out = expand_tokens(grid, cls, direction="v", merge="cat")
    assert torch.equal(out[0, 0, 1], torch.tensor([1.0, 101, 11, 111]))  # [first (row 0); second (row 1)]
    assert torch.equal(cls_out, torch.tensor([[1.0, 2, 1, 2]]))


def test_cls_is_reinserted_at_floor_half_of_the_expanded_grid() -> None:
    out, cls = expand_tokens(GRID, CLS, direction="h", merge="cat")  # 4×2 grid → CLS at index ⌊8/2⌋ = 4
    seq = serialize(out, cls)
    assert seq.shape == (1, 9, 2) and cls_index(4, 2) == 4
    assert torch.equal(seq[0, 4], torch.tensor([-7.0, -7.0]))
    assert torch.equal(seq[0, :4], out[0, :2].reshape(4, 2))
    assert torch.equal(seq[0, 5:], out[0, 2:].reshape(4, 2))


def test_module_form_and_bad_input() -> None:
    te = TokenExpansion(direction="v", merge="avg")
    assert te.out_channels(12) == 12 and TokenExpansion(direction="h", merge="cat").out_channels(12) == 24
    assert torch.equal(te(GRID, CLS)[0], expand_tokens(GRID, CLS, direction="v", merge="avg")[0])
    with pytest.raises(ValueError, match="even grid width"):
        expand_tokens(GRID[:, :, :3], CLS, direction="h", merge="cat")
    with pytest.raises(ValueError, match="even grid height"):
        expand_tokens(GRID[:, :3], CLS, direction="v", merge="cat")
    with pytest.raises(ValueError, match="direction"):
        TokenExpansion(direction="x", merge="cat")  # type: ignore[arg-type]
