"""Pictures of embeddings and runs (matplotlib, Agg backend, PNG).

- `tsne_plot`: 2-D t-SNE of slide embeddings, one colour per label (thesis fig. 4.7);
  perplexity clamped to the number of slides.
- `cluster_mosaic` / `save_cluster_maps`: k-means of a slide's spatial tokens (or region
  CLS tokens) drawn over a mosaic of the store's own regions at their grid coords
  (thesis figs. 4.6, A.2, A.3), so the source slide need not be at hand. The mosaic is
  written pixel-exact (PIL), one PNG per slide, level and k.
- `training_curves`: every numeric column of a run's metrics.csv against the step
  (train rows as lines, validation rows as markers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# tab10 as uint8 RGB: distinct colours for labels and clusters.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
], dtype=np.uint8)  # fmt: skip
UNLABELLED_COLOUR = (0, 0, 0)
BACKGROUND = (255, 255, 255)


def colour(i: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[i % len(PALETTE)])  # type: ignore[return-value]


def clamp_perplexity(n: int, wanted: float = 30.0) -> float:
    """t-SNE needs perplexity < n; the usual rule keeps it ≤ (n − 1) / 3."""
    return float(max(1.0, min(wanted, (n - 1) / 3.0)))


def tsne_plot(
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    path: str | Path,
    *,
    title: str = "",
    perplexity: float = 30.0,
    seed: int = 0,
) -> tuple[Path, list[str]]:
    """t-SNE of (N, C) embeddings coloured by label (None = unlabelled, black); returns (path, notes)."""
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 slides, got {n}")
    used = clamp_perplexity(n, perplexity)
    notes = [f"t-SNE perplexity clamped {perplexity:g} → {used:g} ({n} slides)"] if used < perplexity else []
    xy = TSNE(n_components=2, perplexity=used, init="pca", random_state=seed).fit_transform(x)
    names = sorted({str(v) for v in labels if v is not None and not _missing(v)})
    figure, axes = plt.subplots(figsize=(5, 4.5), dpi=100)
    for i, name in enumerate(names):
        mask = np.array([v is not None and not _missing(v) and str(v) == name for v in labels])
        axes.scatter(xy[mask, 0], xy[mask, 1], s=36, color=np.array(colour(i)) / 255, label=name, edgecolors="none")
    unlabelled = np.array([v is None or _missing(v) for v in labels])
    if unlabelled.any():
        axes.scatter(xy[unlabelled, 0], xy[unlabelled, 1], s=36, color=np.array(UNLABELLED_COLOUR) / 255,
                     marker="x", label="unlabelled")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title or f"t-SNE of {n} slides (perplexity {used:g})", fontsize=9)
    axes.legend(fontsize=7, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path, notes


def _missing(value: object) -> bool:
    return isinstance(value, float) and np.isnan(value)


def kmeans_labels(features: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, int]:
    """k-means cluster ids of (M, C) features, k clamped to the distinct rows; returns (ids (M,), k used)."""
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float64)
    distinct = len(np.unique(x.round(6), axis=0))
    used = max(1, min(k, distinct))
    ids = KMeans(n_clusters=used, n_init=4, random_state=seed).fit_predict(x)
    return ids.astype(np.int64), used


def cluster_mosaic(
    regions: np.ndarray,
    coords: np.ndarray,
    clusters: np.ndarray,
    *,
    alpha: float = 0.5,
    max_side: int = 2048,
    min_side: int = 512,
) -> np.ndarray:
    """The regions at their grid cells with cluster colours blended over them.

    regions: (n, R, R, 3) uint8; coords: (n, 2) (row, col); clusters: (n, h, w) token
    cluster ids (each token colours its R/h × R/w block) or (n,) one id per region.
    Each region is shrunk (nearest neighbour) so the mosaic's longer side is at most
    max_side px, keeping a whole number of pixels per token; a mosaic smaller than
    min_side is enlarged by pixel repetition (small regions stay visible). Cells without
    a region stay white. Returns (rows·s, cols·s, 3) uint8.
    """
    regions, coords = np.asarray(regions), np.asarray(coords, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.ndim == 1:
        clusters = clusters[:, None, None]
    n, size = regions.shape[0], regions.shape[1]
    if len(coords) != n or len(clusters) != n:
        raise ValueError(f"regions ({n}), coords ({len(coords)}) and clusters ({len(clusters)}) must match")
    h, w = clusters.shape[1:]
    origin = coords.min(axis=0)
    cells = coords - origin
    rows, cols = cells.max(axis=0) + 1
    step = max(h, w)
    side = max(step, min(size, max_side // max(rows, cols)) // step * step)
    pick = np.linspace(0, size - 1, side).round().astype(np.int64)
    mosaic = np.empty((rows * side, cols * side, 3), np.uint8)
    mosaic[...] = BACKGROUND
    for region, (r, c), ids in zip(regions, cells, clusters):
        small = region[pick][:, pick].astype(np.float64)
        tint = PALETTE[ids % len(PALETTE)].astype(np.float64)  # (h, w, 3)
        tint = np.repeat(np.repeat(tint, side // h, axis=0), side // w, axis=1)
        mosaic[r * side:(r + 1) * side, c * side:(c + 1) * side] = np.round((1 - alpha) * small + alpha * tint)
    scale = max(1, min_side // max(mosaic.shape[:2]))
    return np.repeat(np.repeat(mosaic, scale, axis=0), scale, axis=1) if scale > 1 else mosaic


def save_cluster_maps(
    regions: np.ndarray,
    coords: np.ndarray,
    features: np.ndarray,
    out_dir: str | Path,
    *,
    name: str,
    ks: Sequence[int] = (3, 4),
    seed: int = 0,
) -> tuple[list[Path], list[str]]:
    """k-means cluster maps of one slide, one PNG per k: `<out_dir>/<name>-k<k>.png`.

    features: (n, h, w, C) spatial tokens or (n, C) region CLS tokens of the n regions.
    """
    from PIL import Image

    features = np.asarray(features)
    grid = features.shape[1:-1]
    flat = features.reshape(-1, features.shape[-1])
    paths, notes = [], []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in ks:
        ids, used = kmeans_labels(flat, k, seed=seed)
        if used < k:
            notes.append(f"{name}: k clamped {k} → {used} (only {used} distinct tokens)")
        mosaic = cluster_mosaic(regions, coords, ids.reshape(len(features), *grid))
        path = out_dir / f"{name}-k{k}.png"
        Image.fromarray(mosaic).save(path)
        paths.append(path)
    return paths, notes


def training_curves(metrics_csv: str | Path, path: str | Path, *, title: str = "") -> tuple[Path, list[str]]:
    """One panel per metric of a run's metrics.csv (train: line, val: markers); returns (path, panel names)."""
    table = pd.read_csv(metrics_csv)
    if table.empty or "step" not in table.columns:
        raise ValueError(f"{metrics_csv} holds no logged steps")
    panels: list[tuple[str, str]] = []
    for phase in ("train", "val"):
        rows = table[table["phase"] == phase]
        for column in table.columns:
            if column in ("phase", "step", "epoch"):
                continue
            values = pd.to_numeric(rows[column], errors="coerce")
            if values.notna().any():
                panels.append((phase, column))
    if not panels:
        raise ValueError(f"{metrics_csv} holds no numeric metrics")
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    figure, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), dpi=100, squeeze=False)
    for ax, (phase, column) in zip(axes.ravel(), panels):
        rows = table[table["phase"] == phase]
        values = pd.to_numeric(rows[column], errors="coerce")
        keep = values.notna()
        marker = "o" if phase == "val" or keep.sum() < 30 else None
        ax.plot(rows["step"][keep], values[keep], marker=marker, markersize=4)
        ax.set_title(f"{phase}/{column}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if column == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path, [f"{p}/{c}" for p, c in panels]
