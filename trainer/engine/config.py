"""Recipes: TOML files → typed, frozen configs, with command-line overrides.

A recipe has one table per component; every key must be a field of that
component's config (a typo is an error naming the file, table and key):

    objective = "supervised"      (optional; must name the `pm-train` command it is used with)
    [model]       name = "pixel_mamba_6m", plus PixelMambaConfig overrides (drop_path_rate, region_fusion, ...)
    [data]        DataConfig
    [optim]       trainer.engine.optim.OptimConfig
    [loop]        trainer.engine.loop.LoopConfig
    [<objective>] the objective's config (`OBJECTIVES[name]().config_cls`), e.g. [supervised]
    [augment]     image-folder mode: trainer.data.augment.TrainAugmentConfig fields,
                  plus [augment.mix] (MixConfig) and [augment.rand_augment] (RandAugmentConfig)

Overrides are dotted keys ("loop.epochs" → 3) applied on top of the file: the
named flags, and `--set section.key=value` for any key (`parse_set` reads the
value as TOML, so 3, 0.5, true, "text" and [1, 2] keep their types); the merged
recipe is what a checkpoint records as its config.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENGINE_TABLES = ("model", "data", "optim", "loop", "augment")
KNOWN_TABLES = ENGINE_TABLES + ("supervised", "latentmim", "dino")


class RecipeError(ValueError):
    """A recipe file or override is malformed."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training data comes from and how it is filtered and read.

    store: tile store path/URL (slide mode), or a list of stores sharing one MPP and
    region size; image_folder/val_folder: ImageNet-style folders (image-folder mode:
    one region per image, Region Fusion off).
    train_split/val_split: split names in the slide table (None val_split: no validation).
    min_regions/max_regions: keep slides with this many regions (thesis: 4..999).
    val_fraction/split_seed: grouped random split when the store has no split column.
    balance_classes: class-balanced sampling of training slides.
    workers: DataLoader worker processes.
    region_size: image-folder mode only (slide mode takes it from the store).
    precrop_regions: region cap N (0 = off): a slide with more regions is cut to a
        connected neighbourhood of N, drawn per sample (`trainer.data.precrop`).
    batch_size: samples per micro-step, for equal-shape samples (image folders);
        `loop.accum_steps` still counts samples and must be a multiple of it.
    fold, folds: case-grouped k-fold cross-validation: train on the other folds,
        validate on fold `fold` (0-based) of `folds` (replaces the store's splits).
    """

    store: str | tuple[str, ...] | None = None
    image_folder: str | None = None
    val_folder: str | None = None
    train_split: str | None = "train"
    val_split: str | None = "val"
    min_regions: int = 4
    max_regions: int = 999
    val_fraction: float = 0.1
    split_seed: int = 0
    balance_classes: bool = False
    workers: int = 2
    region_size: int = 224
    precrop_regions: int = 0
    batch_size: int = 1
    fold: int | None = None
    folds: int = 5

    def __post_init__(self) -> None:
        if self.precrop_regions < 0:
            raise ValueError(f"precrop_regions must be >= 0 (0 = off), got {self.precrop_regions}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.fold is not None and not (self.folds >= 2 and 0 <= self.fold < self.folds):
            raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got fold {self.fold} of {self.folds}")

    def stores(self) -> tuple[str, ...]:
        """The training stores (empty in image-folder mode)."""
        if self.store is None:
            return ()
        return (self.store,) if isinstance(self.store, str) else tuple(self.store)


def load_recipe(path: str | Path | None, tables: tuple[str, ...] = KNOWN_TABLES) -> dict[str, Any]:
    """Read a TOML recipe into a plain dict ({} when path is None); tables: the allowed table names."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        with open(path, "rb") as handle:
            recipe = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid TOML: {exc}") from exc
    unknown = sorted(k for k, v in recipe.items() if isinstance(v, dict) and k not in tables)
    if unknown:
        raise RecipeError(f"recipe {str(path)!r} has unknown table(s) {unknown}; known: {', '.join(tables)}")
    return recipe


def parse_set(items: tuple[str, ...] | list[str], tables: tuple[str, ...] = KNOWN_TABLES) -> dict[str, Any]:
    """`--set section.key=value` items → {"section.key": value}; the value is read as TOML
    (3, 0.5, true, "x", [1, 2]); anything TOML cannot read is taken as a plain string."""
    overrides: dict[str, Any] = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        if not sep or "." not in dotted or not dotted.split(".", 1)[1]:
            raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. loop.epochs=3")
        table = dotted.split(".", 1)[0]
        if table not in tables:
            raise RecipeError(f"--set {item!r}: unknown section {table!r}; known: {', '.join(tables)}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        overrides[dotted] = value
    return overrides


def flatten(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables → dotted keys ({"loop": {"epochs": 3}} → {"loop.epochs": 3})."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(recipe: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `recipe` with dotted-key overrides set ({"loop.epochs": 3}); None values are skipped."""
    merged = copy.deepcopy(dict(recipe))
    for dotted, value in overrides.items():
        if value is None:
            continue
        *tables, key = dotted.split(".")
        node = merged
        for table in tables:
            node = node.setdefault(table, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {dotted!r}: {table!r} is not a table")
        node[key] = value
    return merged


def section(recipe: Mapping[str, Any], table: str, cls: type[T], *, source: str = "recipe") -> T:
    """Build `cls` (a frozen dataclass) from `recipe[table]`; unknown keys are an error.

    Nested dataclass fields (e.g. augment.mix) are built from sub-tables; lists
    become tuples where the field is a tuple.
    """
    values = recipe.get(table, {}) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{source}: [{table}] must be a table, got {values!r}")
    return _build(cls, values, where=f"{source} [{table}]")


def _build(cls: type[T], values: Mapping[str, Any], *, where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, where=f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def _coerce(hint: Any, value: Any, *, where: str) -> Any:
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if is_union else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return _build(option, value, where=where)
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if option is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    scalars = (int, float, str, bool, type(None))
    if options and all(option in scalars for option in options) and not any(
        isinstance(value, option) and not (option is int and isinstance(value, bool)) for option in options
    ):
        expected = " or ".join("none" if option is type(None) else option.__name__ for option in options)
        raise RecipeError(f"{where}: expected {expected}, got {value!r}")
    return value


def plain(value: Any) -> Any:
    """A value as JSON-like plain data (dataclasses → dicts, tuples → lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
