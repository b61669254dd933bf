"""Grouped train/val splits and k-fold: one patient's slides never on both sides."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trainer.data.splits import assign_splits, kfold, split_groups


def cohort(n_cases: int = 40, seed: int = 0, with_missing_case: bool = True) -> pd.DataFrame:
    """1–4 slides per case, two labels by case, a few slides without a case id."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(n_cases):
        for k in range(int(rng.integers(1, 5))):
            rows.append({"slide_id": f"c{case}_s{k}", "case_id": f"case{case}", "label": str(case % 2)})
    if with_missing_case:
        rows += [{"slide_id": f"lone{i}", "case_id": None, "label": str(i % 2)} for i in range(6)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def assert_no_leak(table: pd.DataFrame, split: pd.Series) -> None:
    groups = split_groups(table)
    per_group = split.groupby(groups).nunique()
    assert (per_group == 1).all(), f"groups on both sides: {list(per_group[per_group > 1].index)}"


def test_assign_splits_groups_by_case_and_is_deterministic():
    table = cohort()
    split = assign_splits(table, val_fraction=0.25, seed=7)
    assert split.index.equals(table.index) and set(split) == {"train", "val"}
    assert_no_leak(table, split)
    n_groups = split_groups(table).nunique()
    val_groups = split_groups(table)[split == "val"].nunique()
    assert val_groups == round(0.25 * n_groups)
    assert split.equals(assign_splits(table, val_fraction=0.25, seed=7))
    assert not split.equals(assign_splits(table, val_fraction=0.25, seed=8))
    shuffled = table.sample(frac=1.0, random_state=3)
    again = assign_splits(shuffled, val_fraction=0.25, seed=7)
    assert again.reindex(table.index).equals(split)  # depends on the groups, not the row order


def test_missing_case_id_falls_back_to_slide_id():
    table = pd.DataFrame({"slide_id": ["a", "b", "c"], "case_id": [None, "b", float("nan")]})
    groups = split_groups(table)
    assert groups.tolist() == ["slide:a", "case:b", "slide:c"]
    no_column = split_groups(pd.DataFrame({"slide_id": ["a", "b"]}))
    assert no_column.tolist() == ["slide:a", "slide:b"]


def test_assign_splits_edge_cases():
    table = pd.DataFrame({"slide_id": ["a", "b"]})
    assert sorted(assign_splits(table, val_fraction=0.01)) == ["train", "val"]  # at least one val group
    assert set(assign_splits(table, val_fraction=0.0)) == {"train"}
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits(table, val_fraction=1.0)
    with pytest.raises(ValueError, match="slide_id"):
        assign_splits(pd.DataFrame({"x": [1]}))


@pytest.mark.parametrize("stratified", [True, False])
def test_kfold_partitions_rows_without_leaks(stratified):
    table = cohort(with_missing_case=not stratified)
    if not stratified:
        table.loc[0, "label"] = None  # a missing label turns stratification off
    k = 5
    folds = [kfold(table, k=k, fold=f, seed=2) for f in range(k)]
    val_counts = sum((f == "val").astype(int) for f in folds)
    assert (val_counts == 1).all()  # every slide is validated exactly once
    for split in folds:
        assert_no_leak(table, split)
        assert 0 < (split == "val").sum() < len(table)
    assert folds[1].equals(kfold(table, k=k, fold=1, seed=2))
    if stratified:
        for split in folds:  # both labels in each validation fold
            assert table.loc[split == "val", "label"].nunique() == 2


def test_kfold_errors():
    table = cohort(n_cases=3, with_missing_case=False)
    with pytest.raises(ValueError, match="patients"):
        kfold(table, k=5, fold=0)
    with pytest.raises(ValueError, match="fold"):
        kfold(table, k=2, fold=2)
    with pytest.raises(ValueError, match="at least 2"):
        kfold(table, k=1, fold=0)
