"""`SlideFeed`: a dataset + `SlideSampler` + DataLoader, re-made per epoch at a start position.

The engine asks the feed for "epoch e from this rank's position p" and gets an
iterable of samples. The sampler hands the DataLoader (index, position) pairs;
`PreparedDataset` turns each pair into a prepared sample inside the worker:

    generator = sample_generator(seed, epoch, position, rank, STREAM_PREPARE)
    sample = dataset.read(index, select=region cap)   # only the kept regions are read
    sample = preparer(sample, generator)               # the objective's masks / crops / flips

so a sample comes out the same with 0, 1 or 2 workers and after a resume. The
sampler's order depends only on (seed, epoch). A validation feed (`validation=True`)
seeds each sample by its dataset index instead, so it is prepared identically
whatever the number of ranks and the epoch.

Micro-batches (`batch_size` B > 1, equal-shape samples such as image folders):
B consecutive positions are collated into one packed sample (see
`trainer.data.collate`); each keeps its own position and generators.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.data.collate import collate_samples
from trainer.data.precrop import precrop_indices
from trainer.data.samplers import SlideSampler
from trainer.engine.distributed import DistEnv
from trainer.engine.seeding import STREAM_PREPARE, sample_generator, validation_generator

Preparer = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]


def subset_regions(sample: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """`sample` with only regions `keep` (and their coords); for datasets without `read(select=)`."""
    index = torch.as_tensor(keep, dtype=torch.long)
    return {**sample, "regions": sample["regions"][index], "coords": torch.as_tensor(sample["coords"])[index]}


class PreparedDataset(Dataset):
    """Wraps a dataset so that item (index, position) is read, capped and prepared with its own generator.

    precrop_regions: the region cap N (0 = off), see `trainer.data.precrop`.
    preparer: the objective's `prepare(sample, generator)` (None = none).
    validation: seed by dataset index (rank- and epoch-independent) instead of position.
    The prepared sample carries "position" (the training position, or the index).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int,
        rank: int,
        precrop_regions: int = 0,
        preparer: Preparer | None = None,
        validation: bool = False,
    ) -> None:
        if precrop_regions < 0:
            raise ValueError(f"precrop_regions must be >= 0 (0 = off), got {precrop_regions}")
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.precrop_regions = precrop_regions
        self.preparer = preparer
        self.validation = validation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):  # per-epoch augmentation draws (image folders)
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def generator(self, index: int, position: int) -> torch.Generator:
        if self.validation:
            return validation_generator(self.seed, index, STREAM_PREPARE)
        return sample_generator(self.seed, self.epoch, position, self.rank, STREAM_PREPARE)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, position = (int(k) for k in key)
        generator = self.generator(index, position)
        limit = self.precrop_regions
        if limit and hasattr(self.dataset, "read"):
            sample = self.dataset.read(index, select=lambda coords: precrop_indices(coords, limit, generator))
        else:
            sample = self.dataset[index]
            if limit and sample["regions"].shape[0] > limit:
                sample = subset_regions(sample, precrop_indices(sample["coords"], limit, generator))
        if self.preparer is not None:
            sample = self.preparer(sample, generator)
        sample["position"] = index if self.validation else position
        return sample


def _worker_ignores_signals(_: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which finishes the step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SlideFeed:
    """Epoch-wise iteration over a dataset for this rank.

    labels: per-sample class ids, needed only for `balance=True`.
    workers: DataLoader worker processes (0 = read in the main process).
    precrop_regions, preparer, validation: see `PreparedDataset`.
    batch_size: samples per micro-step (equal-shape samples only; see `trainer.data.collate`).
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
        precrop_regions: int = 0,
        preparer: Preparer | None = None,
        validation: bool = False,
        batch_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.prepared = PreparedDataset(
            dataset, seed=seed, rank=env.rank, precrop_regions=precrop_regions, preparer=preparer,
            validation=validation,
        )
        self.env = env
        self.workers = workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.batch_size = batch_size
        self.sampler = SlideSampler(
            labels if labels is not None else len(dataset),  # type: ignore[arg-type]
            shuffle=shuffle,
            balance=balance,
            seed=seed,
            rank=env.rank,
            world_size=env.world_size,
        )

    def set_preparer(self, preparer: Preparer | None) -> None:
        """Install the objective's `prepare` step (the engine calls this with `objective.sample_preparer()`)."""
        self.prepared.preparer = preparer

    def __len__(self) -> int:
        """Samples per rank per epoch (equal on every rank)."""
        return self.sampler.shard_size

    def indices(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank visits in `epoch`: (len(self),) int64."""
        self.sampler.set_epoch(epoch, 0)
        return self.sampler.shard()

    def iterate(self, epoch: int, start_index: int = 0) -> Iterable[dict[str, Any]]:
        """This rank's samples (or micro-batches) of `epoch`, skipping the first `start_index`."""
        self.sampler.set_epoch(epoch, start_index)
        self.prepared.set_epoch(epoch)
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, epoch, start_index, self.env.rank]).generate_state(1)[0])
        )
        return DataLoader(
            self.prepared,
            batch_size=self.batch_size,
            sampler=self.sampler.positioned(),
            num_workers=self.workers,
            collate_fn=collate_samples,
            generator=generator,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=_worker_ignores_signals if self.workers else None,
        )
