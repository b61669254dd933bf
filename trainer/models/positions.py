"""Where Pixel-Mamba's output tokens sit on the slide, and 2-D sine-cosine embeddings of that.

Unit and convention: positions are in *final-token* units on the slide, as
(row, col) floats. A region at grid coords (r, c) whose output grid is h×w
tokens covers rows [r·h, (r+1)·h) and cols [c·w, (c+1)·w); its spatial token
(i, j) sits at its centre, (r·h + i + 0.5, c·w + j + 0.5), and its CLS token at
the region's centre, (r·h + h/2, c·w + w/2). With this +0.5 convention a CLS
token and the four central tokens of an even grid are equidistant, and a
region's positions are a pure translation of any other region's.

After Region Fusion a surviving region stands for several input regions; it
takes the position of its representative region (the gallery's id that
`PixelMambaOutput.region_ids` returns; DESIGN.md §9), so objectives index the
input coords with `region_ids` and never recompute fusion.

Plain tensor math: no I/O, nothing about objectives.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SINCOS_BASE = 10000.0


class TokenPositions(NamedTuple):
    """Positions of one encoder output: spatial (m, h, w, 2) and cls (m, 2) float32 (row, col)."""

    spatial: Tensor
    cls: Tensor


def token_positions(coords: Tensor, region_ids: Tensor, grid: tuple[int, int]) -> TokenPositions:
    """Positions of every output token of one encoder call.

    coords: (n, 2) int (row, col) grid coords of the regions the encoder was given
      (in the order given); region_ids: (m,) long, each surviving region's
      representative index into those n regions; grid: (h, w) output tokens per region.
    Returns :class:`TokenPositions` on `coords`' device, in final-token units (see module doc).
    """
    if coords.dim() != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (n, 2), got {tuple(coords.shape)}")
    if region_ids.dim() != 1:
        raise ValueError(f"region_ids must have shape (m,), got {tuple(region_ids.shape)}")
    if region_ids.numel() and (int(region_ids.min()) < 0 or int(region_ids.max()) >= coords.shape[0]):
        raise ValueError(f"region_ids must index the {coords.shape[0]} regions given, got {region_ids.tolist()}")
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    scale = torch.tensor([h, w], dtype=torch.float32, device=coords.device)
    origin = coords[region_ids.to(coords.device)].to(torch.float32) * scale  # (m, 2)
    rows = torch.arange(h, dtype=torch.float32, device=coords.device) + 0.5
    cols = torch.arange(w, dtype=torch.float32, device=coords.device) + 0.5
    offsets = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (h, w, 2)
    spatial = origin[:, None, None, :] + offsets
    cls = origin + scale / 2
    return TokenPositions(spatial=spatial, cls=cls)


def sincos_embedding_2d(positions: Tensor, dim: int, *, base: float = SINCOS_BASE) -> Tensor:
    """2-D sine-cosine embedding of continuous positions (MAE's fixed embedding, for real-valued points).

    positions: (..., 2) float (row, col); dim: embedding width, divisible by 4.
    Returns (..., dim) float32: [sin(row·ω), cos(row·ω), sin(col·ω), cos(col·ω)],
    ω_k = base^(−k / (dim/4)) for k = 0 .. dim/4 − 1. Equal positions give equal vectors.
    """
    if dim < 4 or dim % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    if positions.shape[-1] != 2:
        raise ValueError(f"positions must end in a (row, col) pair, got shape {tuple(positions.shape)}")
    quarter = dim // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float32, device=positions.device) / quarter)
    angles = positions.to(torch.float32)[..., :, None] * omega  # (..., 2, quarter)
    per_axis = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2, dim/2)
    return per_axis.flatten(-2)
