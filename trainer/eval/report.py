"""The evaluation tables of `pm-eval`: rows per (embeddings folder, encoder, feature).

Every table has the checkpoint's row and, when pm-embed wrote one, the random-init
baseline's row beside it: a task the baseline already solves says nothing about
training. Rows are plain dicts (written as JSON); `format_table` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from trainer.eval.embeddings_format import SLIDE_LEVEL_FEATURES, Embeddings
from trainer.eval.metrics import embedding_quality
from trainer.eval.probe import Method, ProbeConfig, ProbeError, cross_validate

METHOD_TITLES = {"linear": "linear probe", "knn": "kNN"}
UNSUPERVISED_COLUMNS = (
    "token_rankme", "token_cosine", "region_rankme", "region_cosine",
    "slide_rankme", "slide_cosine", "slide_rankme_spatial", "slide_cosine_spatial",
)  # fmt: skip


def probe_rows(
    emb: Embeddings, method: Method, *, features: Sequence[str] = SLIDE_LEVEL_FEATURES,
    config: ProbeConfig = ProbeConfig(), name: str = "",
) -> list[dict[str, Any]]:
    """One row per (encoder, feature): mean ± std of each metric over the folds, folds and k used."""
    rows = []
    for encoder in emb.encoders:
        for feature in features:
            row: dict[str, Any] = {"embeddings": name or emb.root.name, "encoder": encoder, "feature": feature,
                                   "method": method}
            try:
                result = cross_validate(method, emb.slide_features(encoder, feature), emb.labels, emb.groups,
                                        num_classes=emb.num_classes, ordinal=emb.ordinal, config=config)
            except ProbeError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            row.update(folds=result.folds, k=result.k, notes=list(result.notes),
                       mean=result.mean, std=result.std, per_fold=result.per_fold)
            rows.append(row)
    return rows


def unsupervised_rows(emb: Embeddings, *, name: str = "") -> list[dict[str, Any]]:
    """RankMe and mean pairwise cosine at token, region (both averaged over slides) and slide level."""
    rows = []
    for encoder in emb.encoders:
        per_slide = emb.slide_metrics(encoder)
        cls = embedding_quality(emb.slide_features(encoder, "cls"))
        spatial = embedding_quality(emb.slide_features(encoder, "spatial"))
        values = {
            "token_rankme": float(per_slide["token_rankme"].mean()),
            "token_cosine": float(per_slide["token_cosine"].mean()),
            "region_rankme": float(per_slide["region_rankme"].mean()),
            "region_cosine": float(per_slide["region_cosine"].mean()),
            "slide_rankme": cls["rankme"], "slide_cosine": cls["cosine"],
            "slide_rankme_spatial": spatial["rankme"], "slide_cosine_spatial": spatial["cosine"],
        }
        rows.append({"embeddings": name or emb.root.name, "encoder": encoder, "slides": len(per_slide),
                     "mean": values})
    return rows


def _cell(row: dict[str, Any], metric: str) -> str:
    mean = row.get("mean", {}).get(metric)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    std = row.get("std", {}).get(metric)
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def format_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str], *, title: str = "") -> str:
    """A fixed-width text table: one line per row, `mean ± std` per metric."""
    label = [" · ".join(str(r[k]) for k in ("embeddings", "encoder", "feature") if k in r) for r in rows]
    cells = [[_cell(r, m) if "error" not in r else ("error" if i == 0 else "") for i, m in enumerate(metrics)]
             for r in rows]
    extra = []
    for r in rows:
        parts = [f"{r['folds']} folds"] if r.get("folds") else []
        if r.get("k"):
            parts.append(f"k={r['k']}")
        extra.append(", ".join(parts) if "error" not in r else r["error"])
    head = ["embedding", *metrics, "setup" if any(extra) else ""]
    width = [max(len(head[0]), *(len(s) for s in label))] + [
        max(len(m), *(len(c[i]) for c in cells)) for i, m in enumerate(metrics)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, width)) + ("  " + head[-1] if head[-1] else ""))
    for name, row_cells, note in zip(label, cells, extra):
        body = "  ".join(c.ljust(w) for c, w in zip([name, *row_cells], width))
        lines.append(body + (f"  {note}" if note else ""))
    return "\n".join(line.rstrip() for line in lines)


def probe_metric_names(emb: Embeddings) -> list[str]:
    """balanced_accuracy, accuracy, and qwk for ordinal labels only."""
    return ["balanced_accuracy", "accuracy", *(["qwk"] if emb.ordinal else [])]


def notes_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Distinct clamping notes of the rows, in order."""
    seen: list[str] = []
    for row in rows:
        for note in row.get("notes", []):
            if note not in seen:
                seen.append(note)
    return seen


def jsonable(value: Any) -> Any:
    """NaN → None and numpy scalars → Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
