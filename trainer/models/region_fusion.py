"""Region Fusion: merge redundant regions by CLS-token similarity (thesis §3.1, DESIGN.md §9).

At a layer with ``n`` current regions (L layers in the network, severity α):

1. Split the regions into a gallery and probes. Gallery size is ``⌈n/2⌉``, probes
   ``⌊n/2⌋``. Evaluation: alternating — even current indices are the gallery, odd
   ones the probes. Training: ``torch.randperm(n, generator=...)``; its first
   ``⌈n/2⌉`` entries are the gallery, the rest the probes.
2. ``k = min(⌈α·n/L⌉, #probes)`` (``α·n/L`` computed exactly with fractions, so
   ``⌈·⌉`` never rounds up on a float error); nothing happens when ``n ≤ 1``.
3. Each probe's best gallery is the one with the highest cosine similarity of the
   CLS tokens (first on ties); the ``k`` probes with the highest best-similarity
   merge (stable order on ties: the lower probe position first).
4. A gallery and all probes merged into it are replaced by their plain mean
   ``(x_g + Σ x_p) / (1 + #probes)`` — sum / count of the *current* regions, not
   a ToMe-style mean weighted by how many original regions each already holds —
   for the CLS token and every spatial token alike.
5. Survivors (galleries and unmerged probes) keep their original order. A
   survivor's representative original region id is its own (a gallery keeps its
   id; merged probes' ids are dropped), and the per-original-region
   ``assignment`` is composed with this layer's mapping.

Selection (steps 1–3) carries no gradient; the averaging does.

Packed views (several slides' or crops' regions in one tensor, each view a
contiguous block): ``fuse_views`` runs the step on each view alone — its own n,
k, split draw (from its own generator) and merges — so no region ever merges
across views, and region ids / assignments stay local to their view.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FusedRegions(NamedTuple):
    """Regions after one Region Fusion step (m ≤ n survivors, n0 original regions).

    spatial: (m, h, w, C); cls: (m, C); region_ids: (m,) long — representative
    original region index per survivor; assignment: (n0,) long — per original
    region, the survivor index it is in now.
    """

    spatial: Tensor
    cls: Tensor
    region_ids: Tensor
    assignment: Tensor


def fusion_count(n: int, *, alpha: float, num_layers: int) -> int:
    """Number of probes merged at a layer with ``n`` current regions: ``min(⌈α·n/L⌉, ⌊n/2⌋)``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be ≥ 1, got {num_layers}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"fusion alpha must be in (0, 1], got {alpha}")
    if n <= 1:
        return 0
    exact = Fraction(alpha).limit_denominator(1_000_000) * n / num_layers
    return min(math.ceil(exact), n // 2)


def survivor_counts(n: int, *, alpha: float, num_layers: int) -> list[int]:
    """Region count after each of ``num_layers`` layers, each fusing ``fusion_count`` probes."""
    counts = []
    for _ in range(num_layers):
        n -= fusion_count(n, alpha=alpha, num_layers=num_layers)
        counts.append(n)
    return counts


def split_gallery_probe(
    n: int, *, random: bool, generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Gallery (⌈n/2⌉,) and probe (⌊n/2⌋,) current-region indices, each sorted ascending.

    ``random=False`` alternates (even indices → gallery, odd → probes).
    ``random=True`` draws ``torch.randperm(n, generator=generator)`` (on the
    generator's device, then moved to ``device``), first ⌈n/2⌉ → gallery.
    """
    n_gallery = (n + 1) // 2
    if not random:
        idx = torch.arange(n, device=device)
        return idx[0::2], idx[1::2]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=gen_device).to(device)
    return perm[:n_gallery].sort().values, perm[n_gallery:].sort().values


def fuse_regions(
    spatial: Tensor,
    cls: Tensor,
    *,
    region_ids: Tensor,
    assignment: Tensor,
    gallery: Tensor,
    probes: Tensor,
    k: int,
) -> FusedRegions:
    """Merge the ``k`` most similar probes into their best galleries (steps 3–5 above).

    spatial: (n, h, w, C); cls: (n, C); region_ids: (n,); assignment: (n0,) with
    values in [0, n); gallery, probes: disjoint index tensors covering [0, n).
    """
    n = spatial.shape[0]
    if k <= 0:
        return FusedRegions(spatial, cls, region_ids, assignment)
    if k > probes.numel():
        raise ValueError(f"cannot merge {k} probes: only {probes.numel()} of {n} regions are probes")
    with torch.no_grad():
        unit = F.normalize(cls.detach().float(), dim=-1)
        sim = unit[probes] @ unit[gallery].T  # (P, G)
        best_gallery = sim.argmax(dim=1)
        best_sim = sim.gather(1, best_gallery[:, None]).squeeze(1)
        order = torch.sort(best_sim, descending=True, stable=True).indices[:k]
        merged = probes[order]
        targets = gallery[best_gallery[order]]

    device = spatial.device
    counts = torch.ones(n, device=device, dtype=spatial.dtype).index_add(
        0, targets, torch.ones(k, device=device, dtype=spatial.dtype)
    )
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[merged] = False

    spatial_sum = spatial.index_add(0, targets, spatial[merged])
    cls_sum = cls.index_add(0, targets, cls[merged])
    kept_counts = counts[keep]
    new_spatial = spatial_sum[keep] / kept_counts[:, None, None, None]
    new_cls = cls_sum[keep] / kept_counts[:, None].to(cls_sum.dtype)

    new_index = torch.cumsum(keep.long(), dim=0) - 1
    new_index[merged] = new_index[targets]
    return FusedRegions(new_spatial, new_cls, region_ids[keep], new_index[assignment])


class RegionFusion(nn.Module):
    """Parameter-free Region Fusion step for one layer of an ``num_layers``-layer network."""

    def __init__(self, *, alpha: float, num_layers: int) -> None:
        super().__init__()
        fusion_count(2, alpha=alpha, num_layers=num_layers)  # validates alpha / num_layers
        self.alpha = alpha
        self.num_layers = num_layers

    def forward(
        self,
        spatial: Tensor,
        cls: Tensor,
        *,
        region_ids: Tensor,
        assignment: Tensor,
        random: bool,
        generator: torch.Generator | None = None,
    ) -> FusedRegions:
        """spatial: (n, h, w, C), cls: (n, C) → :class:`FusedRegions`; random split iff ``random``."""
        n = spatial.shape[0]
        k = fusion_count(n, alpha=self.alpha, num_layers=self.num_layers)
        if k == 0:
            return FusedRegions(spatial, cls, region_ids, assignment)
        gallery, probes = split_gallery_probe(n, random=random, generator=generator, device=spatial.device)
        return fuse_regions(
            spatial, cls, region_ids=region_ids, assignment=assignment, gallery=gallery, probes=probes, k=k
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, num_layers={self.num_layers}"


class FusedViews(NamedTuple):
    """Packed views after one Region Fusion step: survivors of every view concatenated in view order.

    spatial: (Σm_v, h, w, C); cls: (Σm_v, C); counts: survivors m_v per view;
    region_ids, assignment: one tensor per view, local to that view (as in :class:`FusedRegions`).
    """

    spatial: Tensor
    cls: Tensor
    counts: list[int]
    region_ids: list[Tensor]
    assignment: list[Tensor]


def fuse_views(
    fusion: RegionFusion,
    spatial: Tensor,
    cls: Tensor,
    *,
    counts: list[int],
    region_ids: list[Tensor],
    assignment: list[Tensor],
    random: bool,
    generators: list[torch.Generator | None],
) -> FusedViews:
    """Region Fusion of packed views, each view alone (see the module docstring).

    spatial: (Σn_v, h, w, C) and cls: (Σn_v, C), view v's n_v = counts[v] regions contiguous, views in
    order; region_ids[v]: (n_v,), assignment[v]: (n0_v,) local to view v; generators[v] draws view
    v's split (drawn in view order; the same generator may appear more than once).
    """
    if not len(counts) == len(region_ids) == len(assignment) == len(generators):
        raise ValueError(
            f"fuse_views needs one count, region_ids, assignment and generator per view, got "
            f"{len(counts)}, {len(region_ids)}, {len(assignment)}, {len(generators)}"
        )
    if sum(counts) != spatial.shape[0]:
        raise ValueError(f"view counts {counts} sum to {sum(counts)}, but there are {spatial.shape[0]} regions")
    fused = [
        fusion(sp, c, region_ids=ids, assignment=asg, random=random, generator=g)
        for sp, c, ids, asg, g in zip(
            spatial.split(counts), cls.split(counts), region_ids, assignment, generators
        )
    ]
    if len(fused) == 1:
        only = fused[0]
        return FusedViews(only.spatial, only.cls, [only.spatial.shape[0]], [only.region_ids], [only.assignment])
    return FusedViews(
        spatial=torch.cat([f.spatial for f in fused]),
        cls=torch.cat([f.cls for f in fused]),
        counts=[f.spatial.shape[0] for f in fused],
        region_ids=[f.region_ids for f in fused],
        assignment=[f.assignment for f in fused],
    )
