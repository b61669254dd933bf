"""`SlideFeed`: a dataset + `SlideSampler` + DataLoader, re-made per epoch at a start position.

The engine asks the feed for "epoch e from this rank's position p" and gets an
iterable of samples (one slide each). The sampler's order depends only on
(seed, epoch) and the DataLoader's worker seeds on (seed, epoch, p), so a run
resumed at (e, p) reads exactly the slides an uninterrupted run reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.data.samplers import SlideSampler
from trainer.data.tile_dataset import collate_slide
from trainer.engine.distributed import DistEnv


class SlideFeed:
    """Epoch-wise iteration over a dataset for this rank.

    labels: per-sample class ids, needed only for `balance=True`.
    workers: DataLoader worker processes (0 = read in the main process).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        env: DistEnv = DistEnv(),
        shuffle: bool = True,
        balance: bool = False,
        seed: int = 0,
        workers: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.env = env
        self.workers = workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.sampler = SlideSampler(
            labels if labels is not None else len(dataset),  # type: ignore[arg-type]
            shuffle=shuffle,
            balance=balance,
            seed=seed,
            rank=env.rank,
            world_size=env.world_size,
        )

    def __len__(self) -> int:
        """Samples per rank per epoch (equal on every rank)."""
        return self.sampler.shard_size

    def indices(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank visits in `epoch`: (len(self),) int64."""
        self.sampler.set_epoch(epoch, 0)
        return self.sampler.shard()

    def iterate(self, epoch: int, start_index: int = 0) -> Iterable[dict[str, Any]]:
        """This rank's samples of `epoch`, skipping the first `start_index`."""
        self.sampler.set_epoch(epoch, start_index)
        if hasattr(self.dataset, "set_epoch"):  # per-epoch augmentation draws (image folders)
            self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, epoch, start_index, self.env.rank]).generate_state(1)[0])
        )
        return DataLoader(
            self.dataset,
            batch_size=1,
            sampler=self.sampler,
            num_workers=self.workers,
            collate_fn=collate_slide,
            generator=generator,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )


