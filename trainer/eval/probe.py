"""Linear probe and kNN on slide embeddings, cross-validated (thesis §4.2).

Folds: stratified k-fold, grouped by case when case ids are given
(`StratifiedGroupKFold`), so no case is in a training and a test fold at once.
Linear probe: scikit-learn logistic regression on standardised embeddings
(scaler fitted on the training fold). kNN: cosine distance, distance-weighted
vote. Each fold is scored with accuracy, balanced accuracy and, for ordinal
labels, quadratic weighted kappa; the result is the mean ± std (population
std over folds) of each.

Small cohorts: the fold count is clamped to the number of cases (slides) of the
rarest class, k to the smallest per-class count of any training fold; the
result's `notes` say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from trainer.eval.metrics import classification_report

Method = Literal["linear", "knn"]


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """folds: CV folds wanted; k: kNN neighbours wanted; seed: fold assignment and solver;
    c: inverse L2 strength of the logistic regression; max_iter: its solver iterations."""

    folds: int = 5
    k: int = 20
    seed: int = 0
    c: float = 1.0
    max_iter: int = 2000

    def __post_init__(self) -> None:
        if self.folds < 2 or self.k < 1 or self.c <= 0 or self.max_iter < 1:
            raise ValueError(f"need folds >= 2, k >= 1, c > 0, max_iter >= 1; got {self}")


@dataclass(frozen=True)
class ProbeResult:
    """Per-fold metrics and their mean / std; folds and k as actually used."""

    method: Method
    folds: int
    per_fold: list[dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    k: int | None = None
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {"method": self.method, "folds": self.folds, "k": self.k, "mean": self.mean, "std": self.std,
                "per_fold": self.per_fold, "notes": list(self.notes)}


class ProbeError(ValueError):
    """The labels cannot be cross-validated (one class, or a class in a single case)."""


@dataclass(frozen=True)
class FoldPlan:
    splits: list[tuple[np.ndarray, np.ndarray]]
    notes: tuple[str, ...]


def plan_folds(labels: np.ndarray, groups: np.ndarray | None, *, folds: int, seed: int) -> FoldPlan:
    """(train, test) index pairs over labelled samples; labels (N,) int ≥ 0, groups (N,) or None."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ProbeError(f"need at least 2 classes to probe, got {len(classes)} ({len(labels)} labelled slides)")
    unit = "slides"
    if groups is not None:
        groups = np.asarray(groups)
        counts = np.array([len(np.unique(groups[labels == c])) for c in classes])
        unit = "cases"
    rarest = int(counts.min())
    if rarest < 2:
        raise ProbeError(f"class {int(classes[counts.argmin()])} has a single {unit[:-1]}: it cannot be in a "
                         "training and a test fold; cross-validation needs at least 2 per class")
    notes = []
    used = min(folds, rarest)
    if used < folds:
        notes.append(f"folds clamped {folds} → {used} (the rarest class has {rarest} {unit})")
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=used, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(labels)), labels, groups))
    else:
        splitter = StratifiedKFold(n_splits=used, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(labels)), labels))
    return FoldPlan(splits=splits, notes=tuple(notes))


def _summary(per_fold: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = per_fold[0].keys()
    values = {k: np.array([f[k] for f in per_fold], dtype=np.float64) for k in keys}
    mean = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in values.items()}
    std = {k: float(np.nanstd(v)) if np.isfinite(v).any() else float("nan") for k, v in values.items()}
    return mean, std


def _labelled(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray | None):
    embeddings, labels = np.asarray(embeddings, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(f"embeddings must be (N, C) with N = len(labels) = {len(labels)}, got {embeddings.shape}")
    keep = labels >= 0
    return embeddings[keep], labels[keep], (None if groups is None else np.asarray(groups)[keep])


def cross_validate(
    method: Method,
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    ordinal: bool = False,
    config: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Cross-validated linear probe or kNN of (N, C) embeddings; labels (N,) int, -1 = unlabelled (left out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, g = _labelled(embeddings, labels, groups)
    k_classes = int(num_classes if num_classes is not None else (y.max() + 1 if len(y) else 0))
    plan = plan_folds(y, g, folds=config.folds, seed=config.seed)
    notes = list(plan.notes)
    k = None
    if method == "knn":
        fits = min(int(np.unique(y[train], return_counts=True)[1].min()) for train, _ in plan.splits)
        k = max(1, min(config.k, fits))
        if k < config.k:
            notes.append(f"k clamped {config.k} → {k} (smallest class in a training fold has {fits} slides)")
    per_fold = []
    for train, test in plan.splits:
        if method == "linear":
            model = make_pipeline(StandardScaler(), LogisticRegression(C=config.c, max_iter=config.max_iter,
                                                                       random_state=config.seed))
        elif method == "knn":
            model = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")
        else:
            raise ValueError(f"method must be 'linear' or 'knn', got {method!r}")
        model.fit(x[train], y[train])
        predictions = model.predict(x[test])
        per_fold.append(classification_report(y[test], predictions, num_classes=k_classes, ordinal=ordinal))
    mean, std = _summary(per_fold)
    return ProbeResult(method=method, folds=len(plan.splits), per_fold=per_fold, mean=mean, std=std, k=k,
                       notes=tuple(notes))


def probe_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    ordinal: bool = False,
    config: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """Flat {"linear_<metric>": mean, "knn_<metric>": mean} for periodic validation during training.

    embeddings (N, C) slide embeddings of the validation slides, labels (N,) int (-1 = none),
    groups (N,) case ids or None. Empty dict when the labels cannot be cross-validated.
    """
    flat: dict[str, float] = {}
    for method in ("linear", "knn"):
        try:
            result = cross_validate(method, embeddings, labels, groups, num_classes=num_classes, ordinal=ordinal,
                                    config=config)
        except ProbeError:
            return {}
        flat.update({f"{method}_{name}": value for name, value in result.mean.items()})
    return flat


PROBE_VALIDATION_METRICS = frozenset(
    f"{method}_{name}" for method in ("linear", "knn") for name in ("accuracy", "balanced_accuracy")
)
"""What `probe_validation_metrics` can return (no QWK: SSL validation does not know if labels are ordinal)."""


def probe_validation_metrics(records: list[dict], *, config: ProbeConfig = ProbeConfig()) -> dict[str, float]:
    """Linear-probe and kNN metrics for an SSL objective's periodic validation.

    records: the objective's validation records, each with "embedding" (C floats) and "label"
    (class id, -1 = unlabelled). Cross-validated on the labelled validation slides alone
    (stratified folds, clamped to the data); {} when fewer than two classes can be split.
    """
    labelled = [r for r in records if int(r.get("label", -1)) >= 0]
    labels = np.array([int(r["label"]) for r in labelled], dtype=np.int64)
    if len(np.unique(labels)) < 2:
        return {}
    embeddings = np.stack([np.asarray(r["embedding"], dtype=np.float64) for r in labelled])
    return probe_metrics(embeddings, labels, num_classes=int(labels.max()) + 1, config=config)
