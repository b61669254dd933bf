"""Linear probe and kNN: planted signal well above chance, random embeddings near chance, clamping."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.eval.probe import ProbeConfig, ProbeError, cross_validate, plan_folds, probe_metrics, probe_validation_metrics


def planted(n_per_class: int = 40, classes: int = 3, dim: int = 16, signal: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    x = rng.normal(size=(len(labels), dim))
    x[np.arange(len(labels)), labels] += signal  # class c shifted along axis c
    groups = np.array([f"case{i // 2}" for i in range(len(labels))])  # two slides per case, same class
    return x, labels, groups


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_planted_signal_is_found(method: str) -> None:
    x, y, g = planted()
    result = cross_validate(method, x, y, g, num_classes=3, ordinal=True)
    assert result.folds == 5 and not result.notes
    assert result.mean["balanced_accuracy"] > 0.75 and result.mean["qwk"] > 0.5


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_random_embeddings_are_near_chance(method: str) -> None:
    x, y, g = planted(signal=0.0, seed=1)
    result = cross_validate(method, x, y, g, num_classes=3)
    assert abs(result.mean["balanced_accuracy"] - 1 / 3) < 0.15
    assert "qwk" not in result.mean  # not ordinal


def test_folds_never_split_a_case() -> None:
    x, y, g = planted(n_per_class=10)
    plan = plan_folds(y, g, folds=5, seed=0)
    for train, test in plan.splits:
        assert not set(g[train]) & set(g[test])


def test_small_cohort_clamps_folds_and_k() -> None:
    # The demo's shape: 2 classes, 3 cases per class, 2 slides per case.
    x, y, g = planted(n_per_class=6, classes=2, signal=4.0)
    result = cross_validate("knn", x, y, g, num_classes=2, config=ProbeConfig(folds=5, k=20))
    assert result.folds == 3
    assert result.k == 4  # training folds hold 2 cases = 4 slides of each class
    assert any("folds clamped 5 → 3" in n for n in result.notes) and any("k clamped 20 → 4" in n for n in result.notes)


def test_unlabelled_rows_are_left_out_and_single_case_classes_refused() -> None:
    x, y, g = planted(n_per_class=6, classes=2, signal=4.0)
    y_with_unlabelled = np.concatenate([y, [-1, -1]])
    x_more = np.concatenate([x, np.zeros((2, x.shape[1]))])
    g_more = np.concatenate([g, ["u0", "u1"]])
    assert cross_validate("linear", x_more, y_with_unlabelled, g_more).mean["balanced_accuracy"] > 0.9
    with pytest.raises(ProbeError, match="single case"):
        plan_folds(np.array([0, 0, 1, 1]), np.array(["a", "a", "b", "c"]), folds=5, seed=0)


def test_probe_metrics_for_the_training_loop() -> None:
    x, y, g = planted(n_per_class=12, classes=2, signal=4.0)
    metrics = probe_metrics(x, y, g, num_classes=2, ordinal=False)
    assert set(metrics) == {"linear_accuracy", "linear_balanced_accuracy", "knn_accuracy", "knn_balanced_accuracy"}
    assert metrics["linear_balanced_accuracy"] > 0.9
    assert probe_metrics(x, np.zeros(len(y), dtype=int)) == {}  # one class: nothing to report


def test_ssl_validation_records_get_probe_metrics_only_when_labelled() -> None:
    x, y, _ = planted(n_per_class=20, classes=2)
    records = [{"embedding": row.tolist(), "label": int(label)} for row, label in zip(x, y)]
    metrics = probe_validation_metrics(records)
    assert metrics["linear_balanced_accuracy"] > 0.75 and metrics["knn_balanced_accuracy"] > 0.75
    assert "linear_qwk" not in metrics  # SSL validation does not know the labels are ordinal
    unlabelled = [{**r, "label": -1} for r in records]
    assert probe_validation_metrics(unlabelled) == {}
    assert probe_validation_metrics([r for r in records if r["label"] == 0]) == {}  # one class: nothing to probe
