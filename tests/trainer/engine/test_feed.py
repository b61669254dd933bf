"""The feed: (index, position) to workers, per-sample prepare generators, region cap, micro-batches."""

from __future__ import annotations

import pytest
import torch
from engine_data import ColourSlides, GridSlides, RandomMask

from trainer.data.collate import collate_samples
from trainer.engine.distributed import DistEnv
from trainer.engine.feed import SlideFeed
from trainer.engine.seeding import STREAM_FORWARD, STREAM_PREPARE, sample_generator


def epoch(feed: SlideFeed, e: int, start: int = 0) -> list[dict]:
    return list(feed.iterate(e, start))


def fingerprint(samples: list[dict]) -> list[tuple]:
    return [(s["index"], s["position"], s["regions"].sum().item(), s["coords"].tolist(), s["visible"].tolist())
            for s in samples]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_samples_do_not_depend_on_workers_or_resume(workers) -> None:
    def feed(w: int) -> SlideFeed:
        return SlideFeed(GridSlides(7), seed=3, workers=w, precrop_regions=5, preparer=RandomMask())

    reference = fingerprint(epoch(feed(0), 1))
    assert [p for _, p, *_ in reference] == list(range(7))
    assert all(len(coords) == 5 for *_, coords, _ in reference)  # every slide (6..12 regions) capped to 5
    assert fingerprint(epoch(feed(workers), 1)) == reference
    assert fingerprint(epoch(feed(workers), 1, start=4)) == reference[4:]  # a resumed epoch
    assert fingerprint(epoch(feed(0), 2)) != reference  # another epoch draws anew


def test_prepare_and_forward_streams_differ() -> None:
    a = torch.rand(4, generator=sample_generator(0, 1, 2, 0, STREAM_PREPARE))
    b = torch.rand(4, generator=sample_generator(0, 1, 2, 0, STREAM_FORWARD))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.rand(4, generator=sample_generator(0, 1, 2, 0, STREAM_PREPARE)))


def test_validation_is_prepared_by_index_whatever_the_ranks() -> None:
    single = {s["index"]: s["visible"].tolist() for s in
              SlideFeed(GridSlides(5), shuffle=False, preparer=RandomMask(), validation=True).iterate(0)}
    for rank in (0, 1):
        env = DistEnv(rank=rank, world_size=2)
        feed = SlideFeed(GridSlides(5), env=env, shuffle=False, preparer=RandomMask(), validation=True)
        for sample in feed.iterate(7):
            assert sample["visible"].tolist() == single[sample["index"]]


def test_micro_batches_pack_equal_shape_samples() -> None:
    feed = SlideFeed(ColourSlides(5, regions=1), shuffle=False, batch_size=2)
    batches = epoch(feed, 0)
    assert [b.get("batch_size", 1) for b in batches] == [2, 2, 1]
    first = batches[0]
    assert first["regions"].shape == (2, 16, 16, 3) and first["segments"].tolist() == [0, 1]
    assert first["label"].tolist() == [0, 1] and first["position"] == [0, 1] and first["slide_id"] == ["s0", "s1"]
    assert batches[2]["position"] == 4 and "segments" not in batches[2]
    with pytest.raises(ValueError, match="one shape"):
        collate_samples([ColourSlides(1, regions=1)[0], ColourSlides(1, regions=1, size=8)[0]])


def test_move_sample_reaches_nested_view_entries() -> None:
    from trainer.objectives.base import move_sample

    sample = {"regions": torch.zeros(2), "views": [{"indices": torch.arange(3)}, (torch.ones(1), "x")], "id": "s"}
    moved = move_sample(sample, torch.device("meta"))
    assert moved["regions"].device.type == "meta" and moved["views"][0]["indices"].device.type == "meta"
    assert moved["views"][1][0].device.type == "meta" and moved["views"][1][1] == "x" and moved["id"] == "s"
