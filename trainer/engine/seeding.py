"""Per-sample generators: a function of where a sample sits in the run and which stream draws.

    generator = sample_generator(seed, epoch, position, rank, stream)

`position` is the sample's place in this rank's epoch shard. Two streams exist
(`trainer.objectives.base`): STREAM_PREPARE (the loader-side region cap and the
objective's `prepare`: masks, crops, flips) and STREAM_FORWARD (`forward`'s
`step_ctx.generator`: fusion splits, drop path), so no draw of one is ever
replayed by the other. Because the generator depends on nothing else, a sample is
prepared identically in the main process or any DataLoader worker, and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.objectives.base import STREAM_FORWARD, STREAM_PREPARE

__all__ = ["STREAM_FORWARD", "STREAM_PREPARE", "sample_generator", "validation_generator"]


def sample_generator(seed: int, epoch: int, position: int, rank: int, stream: int = STREAM_FORWARD) -> torch.Generator:
    """CPU generator seeded from SeedSequence([seed, epoch, position, rank, stream])."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(position), int(rank), int(stream)])
    return torch.Generator().manual_seed(int(state.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1)))


VALIDATION_EPOCH = 2**31 - 1  # validation draws from its own "epoch", keyed by dataset index (not by rank)


def validation_generator(seed: int, index: int, stream: int = STREAM_PREPARE) -> torch.Generator:
    """Generator of validation sample `index`: the same for any number of ranks and every epoch."""
    return sample_generator(seed, VALIDATION_EPOCH, index, 0, stream)
