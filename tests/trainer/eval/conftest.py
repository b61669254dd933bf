"""Fixtures for the evaluation tests: a tiny two-class store and hand-made checkpoints.

`eval_store`: 32-px regions at 2 µm/px; 3 cases per class ("red", "blue"), one slide per
case, 4–5 regions each (noise around a class colour), plus one unlabelled slide. The
checkpoints are written in the engine's format (see trainer/engine/checkpoint.py and the
SSL contract) from freshly initialised tiny models, so the tests need no training run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import reconcile
from pipeline.schema.format import StoreAttrs
from pipeline.store_writer import create_store, write_slide
from trainer.models.registry import build_model

REGION = 32
SLIDES = [  # slide_id, label, case_id, split, n_regions
    ("red-0", "red", "case-r0", "train", 4), ("red-1", "red", "case-r1", "train", 5),
    ("red-2", "red", "case-r2", "val", 4), ("blue-0", "blue", "case-b0", "train", 5),
    ("blue-1", "blue", "case-b1", "train", 4), ("blue-2", "blue", "case-b2", "val", 4),
    ("free-0", None, "case-u0", "val", 4),
]  # fmt: skip
COLOURS = {"red": (200, 60, 70), "blue": (60, 80, 200), None: (150, 150, 150)}


def write_eval_store(path: Path, *, mpp: float = 2.0) -> Path:
    rng = np.random.default_rng(0)
    create_store(path, StoreAttrs(
        magnification=10.0 / mpp, mpp=mpp, region_size=REGION, min_foreground=0.5,
        codec=codec_settings("none"), segmentation={"method": "test"}, pipeline_version="test",
    ))  # fmt: skip
    for slide_id, label, case, split, n in SLIDES:
        base = np.array(COLOURS[label], np.float64)
        regions = np.clip(base + rng.normal(scale=25, size=(n, REGION, REGION, 3)), 0, 255).astype(np.uint8)
        coords = np.stack([np.arange(n) // 3, np.arange(n) % 3], axis=1).astype(np.int32)
        write_slide(
            path, slide_id, regions=regions, n_regions=n, coords=coords,
            origin=coords[:, ::-1].astype(np.int64) * 64, foreground=np.ones(n, np.float32),
            attrs={"source_path": f"/slides/{slide_id}.tif", "fingerprint": f"fp-{slide_id}", "label": label,
                   "split": split, "case_id": case, "mpp_source": "test", "grid_shape": [2, 3]},
        )  # fmt: skip
    reconcile(path)
    return path


def _payload(model: torch.nn.Module, *, overrides: dict, label_map: dict | None, objective: str) -> dict:
    return {
        "format": "pixel-mamba-checkpoint", "version": 1, "model": model.state_dict(),
        "model_name": "pixel_mamba_tiny", "model_overrides": overrides,
        "model_config": json.loads(json.dumps({"region_size": REGION})), "region_size": REGION, "mpp": 2.0,
        "normalization": {"mean": list(model.config.pixel_mean), "std": list(model.config.pixel_std)},
        "label_map": label_map, "objective_name": objective, "step": 7,
    }  # fmt: skip


def make_supervised_checkpoint(path: Path, seed: int = 1) -> Path:
    """A supervised-style checkpoint: the whole classifier (head included) as "model", no model_source."""
    torch.manual_seed(seed)
    model = build_model("pixel_mamba_tiny", region_size=REGION, num_classes=2)
    torch.save(_payload(model, overrides={"region_size": REGION, "num_classes": 2},
                        label_map={"blue": 0, "red": 1}, objective="supervised"), path)
    return path


def make_ssl_checkpoint(path: Path) -> Path:
    """An SSL-style checkpoint: "model" = teacher, "student" = another encoder, model_source "teacher"."""
    torch.manual_seed(2)
    teacher = build_model("pixel_mamba_tiny", region_size=REGION)
    torch.manual_seed(3)
    student = build_model("pixel_mamba_tiny", region_size=REGION)
    payload = _payload(teacher, overrides={"region_size": REGION}, label_map=None, objective="latentmim")
    payload.update(model_source="teacher", student=student.state_dict())
    torch.save(payload, path)
    return path


@pytest.fixture(scope="session")
def eval_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eval_store(tmp_path_factory.mktemp("evalstore") / "eval.zarr")


@pytest.fixture(scope="session")
def supervised_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_supervised_checkpoint(tmp_path_factory.mktemp("sup") / "best.pt")


@pytest.fixture(scope="session")
def ssl_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ssl_checkpoint(tmp_path_factory.mktemp("ssl") / "last.pt")
