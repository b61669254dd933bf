"""Recipes: TOML → typed configs, overrides, and errors that name the bad key."""

from __future__ import annotations

import pytest

from trainer.data.augment import TrainAugmentConfig
from trainer.engine.config import RecipeError, apply_overrides, load_recipe, plain, section
from trainer.engine.loop import LoopConfig
from trainer.engine.optim import OptimConfig


def test_recipe_overrides_and_typed_sections(tmp_path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[optim]\nlr = 1\nbetas = [0.9, 0.95]\n[loop]\nepochs = 3\n[augment.rand_augment]\nnum_ops = 3\n")
    recipe = apply_overrides(load_recipe(path), {"loop.epochs": 5, "loop.max_steps": None, "model.name": "x"})
    optim = section(recipe, "optim", OptimConfig)
    assert optim.lr == 1.0 and isinstance(optim.lr, float) and optim.betas == (0.9, 0.95)
    assert section(recipe, "loop", LoopConfig).epochs == 5 and recipe["model"] == {"name": "x"}
    assert section(recipe, "augment", TrainAugmentConfig).rand_augment.num_ops == 3
    assert plain(optim)["betas"] == [0.9, 0.95]
    assert load_recipe(None) == {}


def test_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(RecipeError, match="unknown key\\(s\\) \\['epoch'\\]"):
        section({"loop": {"epoch": 3}}, "loop", LoopConfig)
    with pytest.raises(RecipeError, match="accum_steps must be >= 1"):
        section({"loop": {"accum_steps": 0}}, "loop", LoopConfig)
    (tmp_path / "bad.toml").write_text("[loop\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(tmp_path / "bad.toml")
    (tmp_path / "odd.toml").write_text("[optimiser]\nlr = 1\n")
    with pytest.raises(RecipeError, match="unknown table"):
        load_recipe(tmp_path / "odd.toml")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("validate_every", 0, "validate_every must be >= 1"),  # else a ZeroDivisionError at the first epoch's end
        ("log_every", 0, "log_every must be >= 1"),  # else a ZeroDivisionError at the first step
        ("checkpoint_every", -5, "checkpoint_every must be >= 0"),
        ("clip_grad", -3.0, "clip_grad must be >= 0"),  # a negative norm would flip the gradients
    ],
)
def test_loop_values_that_would_break_a_run_are_refused(key, value, message) -> None:
    with pytest.raises(RecipeError, match=message):
        section({"loop": {key: value}}, "loop", LoopConfig)


@pytest.mark.parametrize("key, value, expected", [("seed", "abc", "int"), ("epochs", "abc", "int"),
                                                  ("amp", 3, "str")])
def test_a_value_of_the_wrong_type_names_the_field(key, value, expected) -> None:
    with pytest.raises(RecipeError, match=f"expected {expected}"):
        section({"loop": {key: value}}, "loop", LoopConfig)
