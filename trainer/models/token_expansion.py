"""Token Expansion: merge non-overlapping neighbour pairs of tokens (thesis §3.1, DESIGN.md §9).

The thesis draws it as pad → shift → merge → stride; the net effect is that
pairs (columns 2j, 2j+1 for horizontal; rows 2i, 2i+1 for vertical) become one
token, either by concatenation ``[first; second]`` along channels (C → 2C) or by
their mean (C unchanged). The CLS token is not part of the grid: for
concatenation its channels are duplicated ``[cls; cls]``, for averaging it is
unchanged; the caller re-inserts it at ``⌊h'·w'/2⌋`` of the new grid when it
serializes again (see :mod:`trainer.models.serialization`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Direction = Literal["h", "v"]
Merge = Literal["cat", "avg"]


def expand_tokens(spatial: Tensor, cls: Tensor, *, direction: Direction, merge: Merge) -> tuple[Tensor, Tensor]:
    """Merge neighbour pairs of a per-region token grid.

    spatial: (n, h, w, C); cls: (n, C).
    Returns spatial (n, h, w/2, C') for ``direction="h"`` or (n, h/2, w, C') for
    ``"v"``, and cls (n, C'), with C' = 2C for ``merge="cat"`` and C for ``"avg"``.
    """
    if direction not in ("h", "v"):
        raise ValueError(f"token expansion direction must be 'h' or 'v', got {direction!r}")
    if merge not in ("cat", "avg"):
        raise ValueError(f"token expansion merge must be 'cat' or 'avg', got {merge!r}")
    n, h, w, c = spatial.shape
    if direction == "h":
        if w % 2:
            raise ValueError(f"horizontal token expansion needs an even grid width, got {h}×{w}")
        pairs = spatial.reshape(n, h, w // 2, 2, c)
    else:
        if h % 2:
            raise ValueError(f"vertical token expansion needs an even grid height, got {h}×{w}")
        pairs = spatial.reshape(n, h // 2, 2, w, c).transpose(2, 3)
    if merge == "cat":
        out = pairs.reshape(*pairs.shape[:3], 2 * c)
        return out, torch.cat([cls, cls], dim=-1)
    return pairs.mean(dim=3), cls


class TokenExpansion(nn.Module):
    """Parameter-free module form of :func:`expand_tokens` (one per table A.1 'TE' entry)."""

    def __init__(self, *, direction: Direction, merge: Merge) -> None:
        super().__init__()
        if direction not in ("h", "v") or merge not in ("cat", "avg"):
            raise ValueError(
                f"bad token expansion ({direction!r}, {merge!r}); want direction 'h'|'v', merge 'cat'|'avg'"
            )
        self.direction: Direction = direction
        self.merge: Merge = merge

    def forward(self, spatial: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        """spatial: (n, h, w, C), cls: (n, C) → merged grid and CLS (see :func:`expand_tokens`)."""
        return expand_tokens(spatial, cls, direction=self.direction, merge=self.merge)

    def out_channels(self, channels: int) -> int:
        return 2 * channels if self.merge == "cat" else channels

    def extra_repr(self) -> str:
        return f"direction={self.direction}, merge={self.merge}"
