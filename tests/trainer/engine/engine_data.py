"""In-memory slides for the engine tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import torch


class ColourSlides(torch.utils.data.Dataset):
    """In-memory two-class slides for engine tests: (4, size, size, 3) uint8 noise, class = dominant colour.

    Sample keys as `TileStoreDataset`'s; label = index % 2; slide_id "s<index>".
    """

    def __init__(self, n: int, *, size: int = 16, regions: int = 4, offset: int = 0) -> None:
        self.n, self.size, self.regions, self.offset = n, size, regions, offset
        self.labels = np.arange(n) % 2
        self.label_map = {"a": 0, "b": 1}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(self.offset + index)
        pixels = rng.integers(0, 120, size=(self.regions, self.size, self.size, 3))
        pixels[..., 0 if index % 2 == 0 else 2] += 120
        return {
            "regions": torch.from_numpy(pixels.astype(np.uint8)),
            "coords": torch.zeros((self.regions, 2), dtype=torch.int64),
            "label": torch.tensor(index % 2),
            "slide_id": f"s{self.offset + index}",
            "index": index,
        }

