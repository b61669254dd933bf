"""Checkpoints: atomic, `weights_only=True`-loadable, RNG round trip, store matching, encoder init."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer.engine import checkpoint as ckpt
from trainer.models import build_model


def test_atomic_save_and_weights_only_load(tmp_path) -> None:
    payload = {"model": {"w": torch.arange(3.0)}, "config": {"a": [1, 2], "b": None}, "rng": ckpt.capture_rng_state()}
    path = ckpt.atomic_save(payload, tmp_path / "run" / "last.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left behind
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"]) and loaded["config"] == payload["config"]
    ckpt.atomic_copy(path, tmp_path / "run" / "best.pt")
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "run" / "best.pt")["model"]["w"], torch.arange(3.0))


def test_rng_state_round_trip() -> None:
    state = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_unreadable_checkpoints_have_clear_errors(tmp_path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(tmp_path / "junk.pt")


def test_store_mismatch_is_refused_with_both_sides_named() -> None:
    trained = {"region_size": 224, "mpp": 2.0}
    ckpt.check_store_matches(trained, region_size=224, mpp=2.0)
    with pytest.raises(ckpt.StoreMismatchError) as err:
        ckpt.check_store_matches(trained, region_size=224, mpp=1.0)
    assert "checkpoint was trained on 224 px regions at 2 µm/px, store has 224 px regions at 1 µm/px" in str(err.value)
    with pytest.raises(ckpt.StoreMismatchError, match="32 px regions"):
        ckpt.check_store_matches(trained, region_size=32, mpp=2.0)
    imagenet = {"region_size": 224, "mpp": None}
    ckpt.check_store_matches(imagenet, region_size=224, mpp=1.0, require_mpp=False)  # --init from ImageNet
    with pytest.raises(ckpt.StoreMismatchError):
        ckpt.check_store_matches(imagenet, region_size=224, mpp=1.0)  # resuming needs the same data


def test_normalization_mismatch_refused() -> None:
    ckpt.check_normalization({"normalization": {"mean": [0.5] * 3, "std": [0.2] * 3}}, mean=[0.5] * 3, std=[0.2] * 3)
    with pytest.raises(ckpt.CheckpointError, match="normalises inputs"):
        ckpt.check_normalization(
            {"normalization": {"mean": [0.5] * 3, "std": [0.2] * 3}}, mean=[0.4] * 3, std=[0.2] * 3
        )


def test_encoder_init_leaves_the_head_fresh() -> None:
    source = build_model("pixel_mamba_tiny", num_classes=5, region_size=16)
    target = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
    head_before = target.head.weight.clone()
    state = {**source.state_dict(), "extra.thing": torch.zeros(1)}
    report = ckpt.load_encoder_weights(target, state)
    assert report["skipped"] == ["head.bias", "head.weight"]
    assert report["unexpected"] == ["extra.thing"] and report["missing"] == ["head.bias", "head.weight"]
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.cls_token, source.cls_token)
    other = build_model("pixel_mamba_tiny", num_classes=2, region_size=16, d_state=8)
    with pytest.raises(ckpt.CheckpointError, match="do not fit"):
        ckpt.load_encoder_weights(other, source.state_dict())
