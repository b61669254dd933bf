"""Model registry: every registered variant builds, small ones run; overrides and errors."""

from __future__ import annotations

import pytest
import torch

from trainer.models import PixelMambaConfig, build_model, get_config, list_models, register_model
from trainer.models import registry

SMALL_REGION = 64  # variants with regions at most this size run a forward here


def test_the_documented_variants_are_registered() -> None:
    assert {"pixel_mamba_6m", "pixel_mamba_tiny"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_small_ones_run(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=2)
    assert model.config == get_config(name, num_classes=2)
    assert model.embed_dim == model.config.embed_dim
    if model.config.region_size > SMALL_REGION:
        return  # e.g. pixel_mamba_6m at 224 px: built, not run (the benchmark runs it)
    r = model.config.region_size
    out = model.eval()(torch.randint(0, 256, (2, r, r, 3), dtype=torch.uint8))
    h, w = model.config.final_grid
    assert out.spatial_tokens.shape[1:] == (h, w, model.embed_dim)
    assert torch.isfinite(out.logits).all()


def test_overrides_apply_and_are_validated() -> None:
    model = build_model("pixel_mamba_tiny", num_classes=6, region_fusion=False, checkpoint_layers=2, ssm_backend="torch")
    cfg = model.config
    assert (cfg.num_classes, cfg.region_fusion, cfg.checkpoint_layers, cfg.ssm_backend) == (6, False, 2, "torch")
    assert model.head.out_features == 6
    with pytest.raises(TypeError, match="unknown PixelMambaConfig field"):
        build_model("pixel_mamba_tiny", n_classes=6)
    with pytest.raises(KeyError, match="pixel_mamba_6m"):
        build_model("pixel_mamba_huge")


def test_register_model_adds_a_variant_and_refuses_duplicates() -> None:
    name = "pixel_mamba_test_only"
    try:
        @register_model(name)
        def _variant() -> PixelMambaConfig:
            return get_config("pixel_mamba_tiny", region_size=16)

        assert name in list_models()
        assert build_model(name).config.final_grid == (4, 4)
        with pytest.raises(ValueError, match="already registered"):
            register_model(name)(_variant)
    finally:
        registry._REGISTRY.pop(name, None)
