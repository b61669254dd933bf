"""Label encoding: slide-table labels (strings or ints) → class ids.

Integer labels stay integers ("3" → 3, 3 → 3): a store whose labels are all
non-negative integers (ISUP grades, say) keeps their meaning. Any other labels
are mapped to ids in alphabetical order. The map is a plain {label: id} dict so
a checkpoint can record it as JSON and a validation set can reuse it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

NO_LABEL = -1

_INTEGER = re.compile(r"^\+?\d+$")


class UnknownLabelError(ValueError):
    """A slide's label is not in the label map the dataset was given."""


def normalize_label(value: Any) -> str | None:
    """One label as its canonical string, None when missing.

    None, NaN and "" are missing; integral floats (3.0, as pandas makes of an
    int column with gaps) become "3"; everything else is `str(value).strip()`.
    """
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, bool):
        return str(value)
    text = str(value).strip()
    if _INTEGER.match(text):
        return str(int(text))
    return text or None


def build_label_map(labels: Iterable[Any]) -> dict[str, int]:
    """{label: id} over the distinct non-missing labels.

    All-integer labels map to themselves; otherwise ids follow alphabetical order.
    """
    distinct = {label for label in map(normalize_label, labels) if label is not None}
    if distinct and all(_INTEGER.match(label) for label in distinct):
        return {label: int(label) for label in sorted(distinct, key=int)}
    return {label: i for i, label in enumerate(sorted(distinct))}


def encode_label(value: Any, label_map: Mapping[str, int], *, slide_id: str = "") -> int:
    """Class id of one label, `NO_LABEL` (-1) when missing.

    Raises UnknownLabelError naming the label, the slide and the known labels.
    """
    label = normalize_label(value)
    if label is None:
        return NO_LABEL
    try:
        return int(label_map[label])
    except KeyError:
        where = f" of slide {slide_id!r}" if slide_id else ""
        known = ", ".join(repr(k) for k in sorted(label_map)) or "none"
        raise UnknownLabelError(
            f"label {label!r}{where} is not in the label map (known labels: {known}); "
            "pass the training set's label_map or add the label to it"
        ) from None


def num_classes(label_map: Mapping[str, int]) -> int:
    """Number of classes a head needs: max id + 1 (0 for an empty map)."""
    return max(label_map.values(), default=-1) + 1
