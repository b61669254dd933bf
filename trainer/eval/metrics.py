"""Embedding metrics shared by training monitors and `pm-eval` (plain math, no I/O).

A leaf module: objectives (collapse monitors, SSL validation) and the evaluation
commands both import it, and it imports nothing from the project.
"""

from __future__ import annotations

import numpy as np
import torch

RANKME_EPS = 1e-7


def rankme(embeddings: torch.Tensor | np.ndarray, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023) of an (N, K) embedding matrix: exp(entropy of the
    normalised singular values), p_k = σ_k / Σσ + ε; between 1 and min(N, K)."""
    z = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    z = z.detach().to(torch.float64).reshape(z.shape[0], -1)
    if z.shape[0] == 0:
        return float("nan")
    sigma = torch.linalg.svdvals(z)
    total = sigma.sum()
    if total <= 0:
        return 1.0
    p = sigma / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def mean_pairwise_cosine(embeddings: torch.Tensor | np.ndarray) -> float:
    """Mean cosine similarity over all unordered pairs of distinct rows of an (N, K) matrix.

    1.0 means every row points the same way (collapse); NaN for fewer than 2 rows.
    """
    z = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    z = z.detach().to(torch.float64).reshape(z.shape[0], -1)
    n = z.shape[0]
    if n < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(z, dim=1, eps=1e-12)
    total = unit.sum(dim=0)
    # Σ_{i≠j} u_i·u_j = |Σ u|² − Σ |u_i|²
    pair_sum = total.dot(total) - (unit * unit).sum()
    return float(pair_sum / (n * (n - 1)))
