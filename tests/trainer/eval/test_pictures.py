"""Pictures: planted clusters land where planted; one t-SNE colour per label; training curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from trainer.eval.pictures import PALETTE, clamp_perplexity, cluster_mosaic, save_cluster_maps, training_curves, tsne_plot


def _colours(image: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}


def test_cluster_map_shows_the_two_planted_clusters_where_planted(tmp_path) -> None:
    # 4 grey regions on a 2×2 grid, 8×8 token grids; tokens in the left half of every region
    # point one way, tokens in the right half another.
    rng = np.random.default_rng(0)
    regions = np.full((4, 32, 32, 3), 128, np.uint8)
    coords = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    tokens = rng.normal(scale=0.01, size=(4, 8, 8, 6))
    tokens[:, :, :4, 0] += 5.0
    tokens[:, :, 4:, 1] += 5.0
    (path,), notes = save_cluster_maps(regions, coords, tokens, tmp_path, name="slide", ks=(2,))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] == image.shape[1] >= 64 and not notes
    assert len(_colours(image)) == 2
    s = image.shape[0] // 2  # one region's side in the picture
    for r in (0, 1):
        for c in (0, 1):
            cell = image[r * s:(r + 1) * s, c * s:(c + 1) * s]
            left, right = _colours(cell[:, : s // 2]), _colours(cell[:, s // 2:])
            assert len(left) == 1 and len(right) == 1 and left != right
            assert left == _colours(image[:s, : s // 2])  # the same cluster on the left of every region


def test_region_level_map_and_empty_cells_stay_white() -> None:
    regions = np.full((2, 16, 16, 3), 200, np.uint8)
    mosaic = cluster_mosaic(regions, np.array([[3, 5], [4, 6]]), np.array([0, 1]), alpha=1.0, min_side=0)
    assert mosaic.shape == (32, 32, 3)
    assert (mosaic[:16, :16] == PALETTE[0]).all() and (mosaic[16:, 16:] == PALETTE[1]).all()
    assert (mosaic[:16, 16:] == 255).all()  # no region at (3, 6)


def test_mosaic_is_shrunk_to_max_side() -> None:
    regions = np.zeros((2, 224, 224, 3), np.uint8)
    mosaic = cluster_mosaic(regions, np.array([[0, 0], [0, 9]]), np.zeros((2, 7, 7)), max_side=700, min_side=0)
    assert mosaic.shape == (70, 700, 3)


def test_tsne_has_one_colour_per_label(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(6, 8)), rng.normal(size=(6, 8)) + 4])
    labels = ["a"] * 6 + ["b"] * 6
    path, notes = tsne_plot(x, labels, tmp_path / "tsne.png")
    assert notes == ["t-SNE perplexity clamped 30 → 3.66667 (12 slides)"]
    assert clamp_perplexity(12) < 12
    present = _colours(np.asarray(Image.open(path).convert("RGB")))
    palette = [tuple(int(v) for v in c) for c in PALETTE]
    assert [c in present for c in palette] == [True, True] + [False] * 8


def test_training_curves_plot_every_metric(tmp_path) -> None:
    csv = tmp_path / "metrics.csv"
    pd.DataFrame([
        {"phase": "train", "step": 1, "epoch": 0, "loss": 1.0, "lr": 1e-3, "cosine_visible": 0.9},
        {"phase": "train", "step": 2, "epoch": 0, "loss": 0.8, "lr": 2e-3, "cosine_visible": 0.8},
        {"phase": "val", "step": 2, "epoch": 0, "loss": 0.7, "balanced_accuracy": 0.5},
    ]).to_csv(csv, index=False)
    path, panels = training_curves(csv, tmp_path / "curves.png")
    assert path.is_file()
    assert panels == ["train/loss", "train/lr", "train/cosine_visible", "val/loss", "val/balanced_accuracy"]
