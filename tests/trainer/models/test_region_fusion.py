"""Region Fusion on hand-made regions whose merges, averages, ids and assignment are stated exactly."""

from __future__ import annotations

import pytest
import torch

from trainer.models.region_fusion import RegionFusion, fuse_regions, fusion_count, split_gallery_probe, survivor_counts


def _regions(cls_rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS tokens as given; region i's 1×2 spatial grid holds [[i, 100 + i], [−i, 50]] (C = 2)."""
    cls = torch.tensor(cls_rows)
    spatial = torch.stack(
        [torch.tensor([[[float(i), 100.0 + i], [-float(i), 50.0]]]) for i in range(len(cls_rows))]
    )  # (n, 1, 2, 2)
    return spatial, cls


# Five regions: r1 is r0's twin (cos 1), r3 is close to r2 (cos ≈ 0.98), r4 points away.
FIVE = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.2, 1.0], [-1.0, 0.0]]


def _fuse(cls_rows, *, alpha: float, num_layers: int, random: bool = False, generator=None):
    spatial, cls = _regions(cls_rows)
    n = len(cls_rows)
    rf = RegionFusion(alpha=alpha, num_layers=num_layers)
    ids = torch.arange(n)
    return spatial, cls, rf(spatial, cls, region_ids=ids, assignment=ids.clone(), random=random, generator=generator)


def test_eval_alternating_split_merges_the_single_best_probe() -> None:
    # k = min(⌈0.8·5/4⌉, 2) = 1: gallery {0, 2, 4}, probes {1, 3}; r1→r0 (cos 1) beats r3→r2.
    spatial, cls, out = _fuse(FIVE, alpha=0.8, num_layers=4)
    assert out.region_ids.tolist() == [0, 2, 3, 4]
    assert out.assignment.tolist() == [0, 0, 1, 2, 3]
    torch.testing.assert_close(out.cls[0], (cls[0] + cls[1]) / 2)
    torch.testing.assert_close(out.spatial[0], torch.tensor([[[0.5, 100.5], [-0.5, 50.0]]]))
    torch.testing.assert_close(out.spatial[1:], spatial[[2, 3, 4]])
    torch.testing.assert_close(out.cls[1:], cls[[2, 3, 4]])


def test_two_merges_keep_survivor_order() -> None:
    # k = min(⌈0.8·5/2⌉, 2) = 2: r1→r0 and r3→r2.
    spatial, cls, out = _fuse(FIVE, alpha=0.8, num_layers=2)
    assert out.region_ids.tolist() == [0, 2, 4]
    assert out.assignment.tolist() == [0, 0, 1, 1, 2]
    torch.testing.assert_close(out.cls, torch.tensor([[1.0, 0.0], [0.1, 1.0], [-1.0, 0.0]]))
    torch.testing.assert_close(out.spatial[1], torch.tensor([[[2.5, 102.5], [-2.5, 50.0]]]))


def test_gallery_and_all_its_probes_averaged_by_sum_over_count() -> None:
    # n = 4, k = min(⌈0.8·4/1⌉, 2) = 2; both probes (r1, r3) pick gallery r0: (r0 + r1 + r3) / 3.
    spatial, cls, out = _fuse([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, -0.1]], alpha=0.8, num_layers=1)
    assert out.region_ids.tolist() == [0, 2]
    assert out.assignment.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(out.cls[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.spatial[0], torch.tensor([[[4 / 3, 100 + 4 / 3], [-4 / 3, 50.0]]]))
    torch.testing.assert_close(out.cls[1], cls[2])


def test_assignment_composes_across_layers() -> None:
    spatial, cls, first = _fuse(FIVE, alpha=0.8, num_layers=2)  # survivors: old 0, 2, 4
    # Second step on the 3 survivors: gallery {0, 2}, probe {1}; make survivor 1 closest to survivor 2.
    cls2 = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [-1.0, 0.0]])
    second = fuse_regions(
        first.spatial, cls2, region_ids=first.region_ids, assignment=first.assignment,
        gallery=torch.tensor([0, 2]), probes=torch.tensor([1]), k=1,
    )  # fmt: skip
    assert second.region_ids.tolist() == [0, 4]
    assert second.assignment.tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(second.spatial[1], (first.spatial[1] + first.spatial[2]) / 2)


def test_training_split_comes_from_the_generator() -> None:
    def split(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return split_gallery_probe(7, random=True, generator=gen, device=torch.device("cpu"))

    g0, p0 = split(0)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert g0.tolist() == sorted(perm[:4].tolist()) and p0.tolist() == sorted(perm[4:].tolist())
    assert sorted(g0.tolist() + p0.tolist()) == list(range(7))
    g0b, p0b = split(0)
    assert torch.equal(g0, g0b) and torch.equal(p0, p0b)
    assert any(not torch.equal(split(s)[0], g0) for s in range(1, 20))
    ge, pe = split_gallery_probe(7, random=False, generator=None, device=torch.device("cpu"))
    assert ge.tolist() == [0, 2, 4, 6] and pe.tolist() == [1, 3, 5]


def test_training_fusion_is_reproducible_with_a_seeded_generator() -> None:
    torch.manual_seed(0)
    cls_rows = torch.randn(9, 3).tolist()
    runs = [
        _fuse(cls_rows, alpha=0.8, num_layers=2, random=True, generator=torch.Generator().manual_seed(5))[2]
        for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert runs[0].region_ids.numel() == 9 - 4  # k = min(⌈0.8·9/2⌉, 4) = 4


def test_single_region_is_left_alone_and_gradients_flow_through_averages() -> None:
    spatial, cls = _regions([[1.0, 0.0]])
    rf = RegionFusion(alpha=0.8, num_layers=1)
    out = rf(spatial, cls, region_ids=torch.tensor([0]), assignment=torch.tensor([0]), random=True)
    assert out.spatial is spatial and out.region_ids.tolist() == [0]

    spatial, cls = _regions(FIVE)
    spatial.requires_grad_(True)
    ids = torch.arange(5)
    out = rf(spatial, cls, region_ids=ids, assignment=ids, random=False)
    out.spatial.sum().backward()
    # k = 2: r0, r1 and r2, r3 are halved into their survivors; r4 passes through.
    assert spatial.grad[:, 0, 0, 0].tolist() == [0.5, 0.5, 0.5, 0.5, 1.0]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [1] * 24),
        (2, [1] * 24),
        (5, [4, 3, 2, 1] + [1] * 20),
        (24, list(range(23, 0, -1)) + [1]),
        (
            100,
            [96, 92, 88, 85, 82, 79, 76, 73, 70, 67, 64, 61, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36],
        ),
    ],
)
def test_survivor_counts_over_24_layers(n: int, expected: list[int]) -> None:
    assert survivor_counts(n, alpha=0.8, num_layers=24) == expected


def test_fusion_count_is_exact_at_integer_boundaries_and_capped_by_probes() -> None:
    assert fusion_count(30, alpha=0.8, num_layers=24) == 1  # 0.8·30/24 = 1 exactly: no round-up
    assert fusion_count(31, alpha=0.8, num_layers=24) == 2
    assert fusion_count(5, alpha=0.8, num_layers=1) == 2  # ⌈4⌉ capped at ⌊5/2⌋ probes
    assert fusion_count(1, alpha=0.8, num_layers=24) == 0
    with pytest.raises(ValueError, match="alpha"):
        fusion_count(4, alpha=0.0, num_layers=24)
