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


def embedding_quality(embeddings: torch.Tensor | np.ndarray) -> dict[str, float]:
    """{"rankme", "cosine"} of an (N, K) matrix: the two collapse measures side by side."""
    return {"rankme": rankme(embeddings), "cosine": mean_pairwise_cosine(embeddings)}


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Fraction of equal entries of two (N,) int arrays (NaN when empty)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return float(np.mean(labels == predictions)) if len(labels) else float("nan")


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (sklearn's definition; NaN when empty).

    Classes that only appear among the predictions count as errors, not as classes.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if not len(labels):
        return float("nan")
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in np.unique(labels)]))


def quadratic_weighted_kappa(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights over the classes 0..num_classes-1.

    Every class takes part in the weight matrix even when absent from both arrays
    (sklearn with `labels=range(K)`), so a distance of one grade costs the same in
    every cohort. NaN when undefined (e.g. a single class everywhere).
    """
    from sklearn.metrics import cohen_kappa_score

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if not len(labels):
        return float("nan")
    low, high = min(labels.min(), predictions.min()), max(labels.max(), predictions.max())
    if num_classes < 1 or low < 0 or high >= num_classes:
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(cohen_kappa_score(labels, predictions, weights="quadratic", labels=list(range(num_classes))))


def classification_report(
    labels: np.ndarray, predictions: np.ndarray, *, num_classes: int, ordinal: bool
) -> dict[str, float]:
    """accuracy, balanced_accuracy and, for ordinal labels only, qwk of (N,) int class ids."""
    report = {"accuracy": accuracy(labels, predictions), "balanced_accuracy": balanced_accuracy(labels, predictions)}
    if ordinal:
        report["qwk"] = quadratic_weighted_kappa(labels, predictions, num_classes)
    return report
