"""SlideSampler: determinism, balancing, DDP shards, mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.samplers import SlideSampler


def test_same_seed_and_epoch_give_the_same_order():
    a, b = SlideSampler(50, seed=4), SlideSampler(50, seed=4)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    a.set_epoch(0)
    assert list(a) == first
    assert list(SlideSampler(50, seed=5)) != first
    assert list(SlideSampler(7, shuffle=False)) == list(range(7))


def test_balancing_draws_classes_about_equally():
    labels = np.array([0] * 180 + [1] * 20)
    sampler = SlideSampler(labels, balance=True, seed=0)
    draws = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(labels)
        draws += order
    fraction_minor = np.mean(labels[draws] == 1)
    assert abs(fraction_minor - 0.5) < 0.03
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)


def test_balancing_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        SlideSampler(10, balance=True)
    with pytest.raises(ValueError, match="have none"):
        SlideSampler([0, 1, -1], balance=True)


@pytest.mark.parametrize("size,world", [(10, 3), (12, 4), (5, 8)])
def test_ddp_shards_are_equal_and_cover_everything(size, world):
    shards = [list(SlideSampler(size, seed=1, rank=r, world_size=world)) for r in range(world)]
    lengths = {len(s) for s in shards}
    assert lengths == {-(-size // world)}
    union = [i for s in shards for i in s]
    assert set(union) == set(range(size))
    assert len(union) - len(set(union)) == world * (-(-size // world)) - size  # only the wrap-around repeats
    single = list(SlideSampler(size, seed=1))
    assert [single[(k * world + r) % size] for k in range(len(shards[0])) for r in range(world)] == [
        shards[r][k] for k in range(len(shards[0])) for r in range(world)
    ]


def test_start_index_resumes_mid_epoch_exactly():
    labels = np.arange(23) % 3
    for rank in range(2):
        full = SlideSampler(labels, balance=True, seed=9, rank=rank, world_size=2)
        full.set_epoch(2)
        uninterrupted = list(full)
        resumed = SlideSampler(labels, balance=True, seed=9, rank=rank, world_size=2)
        resumed.set_epoch(2, start_index=5)
        assert len(resumed) == len(uninterrupted) - 5
        assert list(resumed) == uninterrupted[5:]
        resumed.set_epoch(3)
        assert len(resumed) == len(uninterrupted)  # the next epoch starts from its beginning


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        SlideSampler(0)
    with pytest.raises(ValueError, match="rank"):
        SlideSampler(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_index"):
        SlideSampler(4, start_index=5)


def test_seed_epoch_pairs_never_replay_each_other() -> None:
    from trainer.data.samplers import SlideSampler, epoch_seed

    assert epoch_seed(0, 1) != epoch_seed(1, 0)
    a = SlideSampler(50, seed=0)
    a.set_epoch(1)
    b = SlideSampler(50, seed=1)
    b.set_epoch(0)
    assert a.epoch_order().tolist() != b.epoch_order().tolist()
