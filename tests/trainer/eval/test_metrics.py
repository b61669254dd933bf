"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

from trainer.eval.metrics import (
    accuracy,
    balanced_accuracy,
    classification_report,
    embedding_quality,
    mean_pairwise_cosine,
    quadratic_weighted_kappa,
    rankme,
)


def test_qwk_matches_sklearn_with_absent_classes() -> None:
    # 6 ISUP-like grades, grades 2 and 5 never occur: the weight matrix still spans 0..5.
    labels = np.array([0, 1, 1, 3, 4, 4, 0, 3])
    predictions = np.array([0, 1, 3, 3, 4, 1, 1, 4])
    expected = cohen_kappa_score(labels, predictions, weights="quadratic", labels=list(range(6)))
    assert quadratic_weighted_kappa(labels, predictions, 6) == pytest.approx(expected)
    # Without labels=range(K) sklearn uses only the classes seen, which gives another value.
    assert expected != pytest.approx(cohen_kappa_score(labels, predictions, weights="quadratic"))


def test_qwk_hand_computed() -> None:
    # Two classes, labels [0,0,1,1], predictions [0,1,1,1]: O = [[1,1],[0,2]], weights w_01 = w_10 = 1.
    # Observed disagreement 1/4; expected from marginals (rows 2,2; cols 1,3): (2·3 + 2·1)/16 = 1/2 → κ = 1 − (1/4)/(1/2).
    assert quadratic_weighted_kappa(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2) == pytest.approx(0.5)
    assert quadratic_weighted_kappa(np.array([0, 1, 2]), np.array([0, 1, 2]), 3) == pytest.approx(1.0)


def test_qwk_rejects_ids_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="0..2"):
        quadratic_weighted_kappa(np.array([0, 3]), np.array([0, 1]), 3)


def test_balanced_accuracy_and_accuracy_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    predictions = rng.integers(0, 5, 50)  # class 4 only among the predictions
    assert balanced_accuracy(labels, predictions) == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert accuracy(labels, predictions) == pytest.approx(np.mean(labels == predictions))


def test_classification_report_has_qwk_only_for_ordinal_labels() -> None:
    labels, predictions = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    assert set(classification_report(labels, predictions, num_classes=2, ordinal=False)) == {
        "accuracy", "balanced_accuracy"}
    report = classification_report(labels, predictions, num_classes=2, ordinal=True)
    assert report["balanced_accuracy"] == pytest.approx(0.75) and "qwk" in report


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rankme_of_matrices_with_known_rank(rank: int) -> None:
    # Equal singular values on `rank` directions: p_k = 1/rank, entropy log(rank), RankMe = rank.
    rng = np.random.default_rng(rank)
    u, _ = np.linalg.qr(rng.normal(size=(40, rank)))
    v, _ = np.linalg.qr(rng.normal(size=(16, rank)))
    z = 3.0 * u @ v.T
    assert rankme(z) == pytest.approx(rank, rel=1e-4)


def test_cosine_of_known_vectors() -> None:
    z = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # pairs: (a,b) 0, (a,c) 1/√2, (b,c) 1/√2 → mean √2/3
    assert mean_pairwise_cosine(z) == pytest.approx(math.sqrt(2) / 3)
    assert mean_pairwise_cosine(np.ones((5, 3))) == pytest.approx(1.0)
    quality = embedding_quality(np.ones((5, 3)))
    assert quality["cosine"] == pytest.approx(1.0) and quality["rankme"] == pytest.approx(1.0, abs=1e-5)
