"""Region cap for big slides: keep a connected neighbourhood of at most N regions.

A slide with more than N foreground regions is cut to N regions grown from a
random seed region by grid distance (Prim's order): each step adds the region
nearest (squared Euclidean distance on the (row, col) grid) to any region
already kept. Inside a tissue fragment this adds 8-neighbours before anything
farther, so the kept set is connected; when a fragment is used up it jumps to
the nearest region of the next fragment, so the cap works across fragments.
Ties are broken by a random key from the same generator, so the growth has no
row-major bias. The result is a function of (coords, N, generator state) only.

The indices are computed from the coords alone, before any pixels are read, so
`TileStoreDataset.read(index, select=...)` decodes only the kept regions.
"""

from __future__ import annotations

import numpy as np
import torch


def precrop_indices(coords: np.ndarray | torch.Tensor, limit: int, generator: torch.Generator) -> np.ndarray:
    """Indices of the regions to keep, ascending (so row-major order is kept).

    coords: (n, 2) int (row, col) grid positions of the slide's regions.
    limit: N >= 1; a slide with n <= N keeps every region (and draws nothing).
    generator: CPU generator (the sample's prepare stream).
    Returns (min(n, N),) int64.
    """
    if limit < 1:
        raise ValueError(f"the region cap must be >= 1, got {limit}")
    grid = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = grid.shape[0]
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    start = int(torch.randint(n, (1,), generator=generator))
    tiebreak = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    # squared distances are integers, so adding a key in [0, 1) only orders equal distances
    nearest = np.full(n, np.iinfo(np.int64).max // 2, dtype=np.int64)
    kept = np.zeros(n, dtype=bool)
    chosen = start
    for _ in range(limit):
        kept[chosen] = True
        delta = grid - grid[chosen]
        np.minimum(nearest, (delta * delta).sum(axis=1), out=nearest)
        score = nearest + tiebreak
        score[kept] = np.inf
        chosen = int(np.argmin(score))
    return np.flatnonzero(kept).astype(np.int64)
