"""Train/validation splits and cross-validation folds grouped by patient.

A patient (`case_id`) with several slides must never sit on both sides of a
split, so every assignment here is made per group: the row's `case_id` when it
has one, else its `slide_id` (a slide is its own patient).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from trainer.data.labels import normalize_label

TRAIN = "train"
VAL = "val"


def split_groups(table: pd.DataFrame) -> pd.Series:
    """Group key per row: `case_id` where present, else `slide_id` (as strings).

    Group keys are prefixed ("case:" / "slide:") so a case id that happens to
    equal another slide's id does not join the two.
    """
    if "slide_id" not in table.columns:
        raise ValueError("the slide table has no 'slide_id' column")
    slide_ids = table["slide_id"].astype(str)
    if "case_id" not in table.columns:
        return "slide:" + slide_ids
    keys = [
        f"slide:{slide}" if case is None else f"case:{case}"
        for slide, case in zip(slide_ids, map(normalize_label, table["case_id"]))
    ]
    return pd.Series(keys, index=table.index, dtype=object)


def assign_splits(table: pd.DataFrame, val_fraction: float = 0.1, seed: int = 0) -> pd.Series:
    """Random grouped train/val split: Series of "train"/"val" indexed like `table`.

    round(val_fraction · number of groups) groups (at least one when there are
    two or more groups and val_fraction > 0) go to "val"; the choice depends
    only on the set of groups and `seed`, not on the row order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = split_groups(table)
    unique = np.array(sorted(groups.unique()), dtype=object)
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and n_val == 0 and len(unique) >= 2:
        n_val = 1
    n_val = min(n_val, max(len(unique) - 1, 0))
    order = np.random.default_rng(seed).permutation(len(unique))
    val_groups = set(unique[order[:n_val]])
    return pd.Series(np.where(groups.isin(val_groups), VAL, TRAIN), index=table.index, name="split")


def kfold(table: pd.DataFrame, k: int, fold: int, seed: int = 0) -> pd.Series:
    """Fold `fold` of a grouped k-fold split: Series of "train"/"val" indexed like `table`.

    Stratified by label (sklearn StratifiedGroupKFold) when every row has a
    label and each class has at least k groups; otherwise a shuffled GroupKFold.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    groups = split_groups(table).to_numpy()
    n_groups = len(set(groups))
    if n_groups < k:
        raise ValueError(f"cannot make {k} folds from {n_groups} patients (case_id groups)")
    labels = table["label"].map(normalize_label) if "label" in table.columns else None
    x = np.zeros((len(table), 1))
    if labels is not None and labels.notna().all() and _groups_per_class(labels, groups) >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = splitter.split(x, labels.to_numpy(), groups)
    else:
        folds = GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, groups=groups)
    for i, (_, val_rows) in enumerate(folds):
        if i == fold:
            split = np.full(len(table), TRAIN, dtype=object)
            split[val_rows] = VAL
            return pd.Series(split, index=table.index, name="split")
    raise AssertionError("unreachable: sklearn yielded fewer folds than asked")


def _groups_per_class(labels: pd.Series, groups: np.ndarray) -> int:
    """Smallest number of distinct groups over the classes."""
    frame = pd.DataFrame({"label": labels.to_numpy(), "group": groups})
    return int(frame.groupby("label")["group"].nunique().min())


def by_slide(table: pd.DataFrame, split: pd.Series) -> dict[str, str]:
    """{slide_id: split} from a Series indexed like `table` (for `split_assignment=`)."""
    if not split.index.equals(table.index):
        raise ValueError("the split Series must be indexed like the table it was computed from")
    return dict(zip(table["slide_id"].astype(str), split.astype(str)))
