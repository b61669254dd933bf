"""Serialization of a slide's region grids into one Mamba sequence (DESIGN.md §9).

Tokens live as a per-region grid ``spatial: (n, h, w, C)`` plus one CLS token per
region ``cls: (n, C)``. Only the Mamba block sees the flat sequence: regions in the
given (row-major grid) order, each region's pixels/tokens row-major, and the
region's CLS token at 0-based index ``⌊h·w/2⌋`` of that region's ``h·w + 1`` tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cls_index(h: int, w: int) -> int:
    """0-based position of the CLS token inside one region's ``h·w + 1`` tokens."""
    return (h * w) // 2


def serialize(spatial: Tensor, cls: Tensor) -> Tensor:
    """Flatten region grids and CLS tokens into one sequence.

    spatial: (n, h, w, C); cls: (n, C) → (1, n·(h·w + 1), C).
    """
    n, h, w, c = spatial.shape
    if cls.shape != (n, c):
        raise ValueError(
            f"cls must have shape {(n, c)} to match spatial {tuple(spatial.shape)}, got {tuple(cls.shape)}"
        )
    flat = spatial.reshape(n, h * w, c)
    p = cls_index(h, w)
    seq = torch.cat([flat[:, :p], cls[:, None, :].to(flat.dtype), flat[:, p:]], dim=1)
    return seq.reshape(1, n * (h * w + 1), c)


def deserialize(seq: Tensor, n: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`serialize`.

    seq: (1, n·(h·w + 1), C) → spatial (n, h, w, C), cls (n, C).
    """
    c = seq.shape[-1]
    if seq.shape != (1, n * (h * w + 1), c):
        raise ValueError(f"sequence of shape {tuple(seq.shape)} does not hold {n} regions of {h}×{w} tokens plus CLS")
    per_region = seq.reshape(n, h * w + 1, c)
    p = cls_index(h, w)
    cls = per_region[:, p]
    spatial = torch.cat([per_region[:, :p], per_region[:, p + 1 :]], dim=1).reshape(n, h, w, c)
    return spatial, cls
