"""`SlideSampler`: the order in which slides are visited, per epoch and per rank.

One sampler serves single-process and DDP training. The epoch's global order
is a function of (seed, epoch) only (a SeedSequence of the pair, so seed 0 epoch 1
never replays seed 1 epoch 0), so every rank computes the same order and
takes its own shard; shards have equal length (the order is padded by wrapping
around) so no rank waits for another at the end of an epoch. `start_index`
skips the first k samples of this rank's shard, so a run resumed mid-epoch
visits exactly the slides an uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class SlideSampler(Sampler[int]):
    """Epoch-seeded, optionally class-balanced, DDP-sharded sampler of dataset indices.

    labels: per-sample class ids (e.g. `TileStoreDataset.labels`), or the
        dataset length when there are none (balancing then impossible).
    shuffle: permute per epoch; False keeps dataset order (evaluation).
    balance: draw with replacement, weight of a sample ∝ 1 / (its class count),
        `len(labels)` draws per epoch; every sample needs a label (≥ 0).
    seed: base seed; the epoch's generator is seeded from SeedSequence([seed, epoch]).
    rank, world_size: this process's shard of the epoch's order.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | int,
        *,
        shuffle: bool = True,
        balance: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
    ) -> None:
        if isinstance(labels, (int, np.integer)):
            self._labels: np.ndarray | None = None
            self._size = int(labels)
        else:
            self._labels = np.asarray(labels, dtype=np.int64)
            self._size = len(self._labels)
        if self._size <= 0:
            raise ValueError("cannot sample from an empty dataset (no slide passed the filters)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if balance:
            if self._labels is None:
                raise ValueError("class balancing needs per-sample labels, not just a length")
            if (self._labels < 0).any():
                missing = int((self._labels < 0).sum())
                raise ValueError(f"class balancing needs a label on every slide; {missing} have none")
        self.shuffle = shuffle
        self.balance = balance
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_index = 0
        self.set_start_index(start_index)

    @property
    def shard_size(self) -> int:
        """Samples per rank per epoch (the same on every rank)."""
        return math.ceil(self._size / self.world_size)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's order; `start_index` skips that many of this rank's samples."""
        self.epoch = int(epoch)
        self.set_start_index(start_index)

    def set_start_index(self, start_index: int) -> None:
        """Skip the first `start_index` samples of this rank's shard (mid-epoch resume)."""
        if not 0 <= start_index <= self.shard_size:
            raise ValueError(f"start_index must be in 0..{self.shard_size}, got {start_index}")
        self.start_index = int(start_index)

    def epoch_order(self) -> np.ndarray:
        """The epoch's global order before sharding: (size,) int64 dataset indices."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.balance:
            assert self._labels is not None
            _, inverse, counts = np.unique(self._labels, return_inverse=True, return_counts=True)
            weights = torch.from_numpy(1.0 / counts[inverse])
            order = torch.multinomial(weights, self._size, replacement=True, generator=generator)
            return order.numpy()
        if self.shuffle:
            return torch.randperm(self._size, generator=generator).numpy()
        return np.arange(self._size, dtype=np.int64)

    def shard(self) -> np.ndarray:
        """This rank's full shard for the epoch: (shard_size,) int64, before start_index."""
        order = self.epoch_order()
        total = self.shard_size * self.world_size
        padded = np.resize(order, total)  # wraps around: pads with the order's first entries
        return padded[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start_index :].tolist())

    def positioned(self) -> PositionedSampler:
        """A sampler over (index, position) pairs of the current epoch and start (see `PositionedSampler`)."""
        return PositionedSampler(self)

    def __len__(self) -> int:
        return self.shard_size - self.start_index


def epoch_seed(seed: int, epoch: int) -> int:
    """The epoch order's seed: distinct for every (seed, epoch) pair (a 63-bit SeedSequence draw)."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class PositionedSampler(Sampler[tuple[int, int]]):
    """(dataset index, position in this rank's epoch shard) pairs, from `start_index` on.

    The position is what per-sample randomness is seeded from (with seed, epoch and
    rank), so DataLoader workers can compute a sample's generator themselves.
    """

    def __init__(self, sampler: SlideSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.sampler.start_index
        indices = self.sampler.shard()[start:].tolist()
        return iter([(index, start + k) for k, index in enumerate(indices)])

    def __len__(self) -> int:
        return len(self.sampler)
