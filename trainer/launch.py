"""Building a training run from a recipe: the wiring every objective shares.

    recipe = build_recipe(name, config_path=..., resume=payload, flags={...}, sets=[...])
    run = prepare_run(name, recipe, out_dir=..., device=..., env=..., resume=..., init=...)
    run.trainer.fit(resume=...)

recipe (+ flags) → datasets (one or several stores, or an image folder) → model
(`trainer.models.build_model`, a head only for objectives that need one) →
objective (`OBJECTIVES[name]().build(encoder, config, BuildContext)`) → feeds
(region cap, the objective's `prepare`, micro-batches) → `Trainer`. Nothing here
knows any objective: an objective registers its spec and gets `pm-train <name>`
with every flag. Bad input raises `LaunchError` with a one-line message (the CLI
shows it without a traceback).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from trainer.engine import checkpoint as ckpt
from trainer.engine.config import (
    ENGINE_TABLES,
    DataConfig,
    RecipeError,
    apply_overrides,
    flatten,
    load_recipe,
    parse_set,
    plain,
    section,
)
from trainer.engine.distributed import DistEnv
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, Trainer
from trainer.engine.memory import MemoryEstimateError, check_memory
from trainer.engine.optim import OptimConfig
from trainer.objectives import OBJECTIVES, BuildContext, ObjectiveSpec


class LaunchError(ValueError):
    """The run cannot be set up as asked (message is one line for the user)."""


def recipe_tables() -> tuple[str, ...]:
    """Tables a recipe may hold: the engine's plus one per registered objective."""
    return ENGINE_TABLES + tuple(name for name in OBJECTIVES if name not in ENGINE_TABLES)


def objective_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise LaunchError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


def build_recipe(
    name: str,
    *,
    config_path: str | None,
    resume: Mapping[str, Any] | None,
    flags: Mapping[str, Any],
    sets: Sequence[str] = (),
) -> dict[str, Any]:
    """The merged recipe: the resumed run's recipe, then the file, then flags, then `--set` items.

    flags: dotted keys ({"loop.epochs": 3}); None values are left out.
    """
    tables = recipe_tables()
    try:
        file_recipe = load_recipe(config_path, tables)
        base = dict(resume.get("config") or {}) if resume else {}
        merged = apply_overrides(base, flatten(file_recipe)) if file_recipe else base
        merged = apply_overrides(merged, flags)
        merged = apply_overrides(merged, parse_set(list(sets), tables))
    except RecipeError as exc:
        raise LaunchError(str(exc)) from None
    named = merged.get("objective")
    if named is not None and named != name:
        raise LaunchError(f"the recipe is for the {named!r} objective; run it with `pm-train {named}`")
    merged["objective"] = name
    return merged


@dataclass(kw_only=True)
class PreparedRun:
    """What `prepare_run` built: the trainer and what the CLI reports."""

    trainer: Trainer
    train_size: int
    val_size: int
    model_name: str
    notes: list[str]


def clear_run_folder(out_dir: Path) -> None:
    """--overwrite: remove the earlier run's checkpoints, metrics and TensorBoard files."""
    for name in (ckpt.LAST, ckpt.BEST, "metrics.csv"):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)


def check_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    existing = out_dir / ckpt.LAST
    if existing.exists() and not resume and not overwrite:
        raise LaunchError(
            f"{out_dir} already holds a run ({existing.name}); continue it with "
            f"--resume {existing}, or pass --overwrite to start a new run there"
        )


def prepare_run(
    name: str,
    recipe: dict[str, Any],
    *,
    out_dir: Path,
    device: torch.device,
    env: DistEnv,
    resume: Mapping[str, Any] | None = None,
    init: Mapping[str, Any] | None = None,
    force: bool = False,
) -> PreparedRun:
    """Datasets, model, objective, feeds and trainer for objective `name` from `recipe`."""
    spec = objective_spec(name)
    try:
        data_cfg = section(recipe, "data", DataConfig)
        optim_cfg = section(recipe, "optim", OptimConfig)
        loop_cfg = section(recipe, "loop", LoopConfig)
        objective_cfg = section(recipe, name, spec.config_cls)
    except RecipeError as exc:
        raise LaunchError(str(exc)) from None
    if bool(data_cfg.stores()) == bool(data_cfg.image_folder):
        raise LaunchError("give exactly one of --store (slides; may be repeated) or --image-folder (images)")
    notes: list[str] = []
    torch.manual_seed(loop_cfg.seed)
    label_map = resume.get("label_map") if resume else None
    requires_labels = _requires_labels(spec)
    data_cfg = _with_objective_floor(data_cfg, spec, notes)
    if data_cfg.stores():
        train_ds, val_ds, region_size, mpp = store_datasets(data_cfg, label_map, requires_labels, notes)
    else:
        train_ds, val_ds, region_size, mpp = folder_datasets(data_cfg, recipe, loop_cfg.seed, label_map)
    label_map = dict(train_ds.label_map)

    for payload, what in ((resume, "--resume"), (init, "--init")):
        if payload is not None:
            try:
                ckpt.check_store_matches(payload, region_size=region_size, mpp=mpp, require_mpp=what == "--resume")
            except ckpt.StoreMismatchError as exc:
                raise LaunchError(f"{what}: {exc}") from None

    model_section = dict(recipe.get("model") or {})
    model_name = model_section.pop("name", "pixel_mamba_6m")
    overrides: dict[str, Any] = {**model_section, "region_size": region_size}
    if spec.needs_head:
        if not label_map:
            raise LaunchError(f"the {name} objective needs slide labels, and the training data has none")
        overrides["num_classes"] = max(label_map.values()) + 1
    if data_cfg.image_folder:
        overrides["region_fusion"] = False
    model = build_model(model_name, overrides)
    normalization = {"mean": list(model.config.pixel_mean), "std": list(model.config.pixel_std)}
    if resume is not None:
        try:
            ckpt.check_normalization(resume, mean=normalization["mean"], std=normalization["std"])
        except ckpt.CheckpointError as exc:
            raise LaunchError(f"--resume: {exc}") from None
    if init is not None:
        notes.append(init_encoder(model, model_name, init, normalization))

    try:
        objective = spec.build(model, objective_cfg, BuildContext(label_map=label_map, region_size=region_size, mpp=mpp))
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"cannot build the {name} objective: {exc}") from None

    fusion = bool(getattr(model.config, "region_fusion", False))
    try:
        notes += check_memory(
            model_name=model_name, device=device, amp=loop_cfg.amp, region_fusion=fusion,
            region_size=region_size, checkpoint_layers=int(getattr(model.config, "checkpoint_layers", 0)),
            regions_per_step=objective.regions_per_step(_largest_step_regions(train_ds, data_cfg)), force=force,
        )
    except MemoryEstimateError as exc:
        raise LaunchError(str(exc)) from None

    try:
        train_feed = SlideFeed(
            train_ds, env=env, shuffle=True, balance=data_cfg.balance_classes, seed=loop_cfg.seed,
            workers=data_cfg.workers, labels=getattr(train_ds, "labels", None), pin_memory=device.type == "cuda",
            precrop_regions=data_cfg.precrop_regions, batch_size=data_cfg.batch_size,
        )
        val_feed = (
            SlideFeed(val_ds, env=env, shuffle=False, seed=loop_cfg.seed, workers=data_cfg.workers,
                      precrop_regions=data_cfg.precrop_regions, validation=True)
            if val_ds is not None and len(val_ds) else None
        )
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    meta = {
        "config": plain(recipe),
        "model_name": model_name,
        "model_overrides": plain(overrides),
        "model_config": json.loads(json.dumps(plain(model.config))),
        "region_size": int(region_size),
        "mpp": None if mpp is None else float(mpp),
        "magnification": None if mpp is None else float(10.0 / mpp),
        "normalization": normalization,
        "label_map": label_map if label_map else None,
        "data_source": list(data_cfg.stores()) if data_cfg.stores() else data_cfg.image_folder,
    }
    try:
        trainer = Trainer(
            objective, train=train_feed, val=val_feed, optim_config=optim_cfg, loop_config=loop_cfg,
            out_dir=out_dir, device=device, env=env, checkpoint_meta=meta,
        )
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    return PreparedRun(
        trainer=trainer, train_size=len(train_ds), val_size=len(val_ds) if val_ds is not None else 0,
        model_name=model_name, notes=notes,
    )


def _with_objective_floor(cfg: DataConfig, spec: ObjectiveSpec, notes: list[str]) -> DataConfig:
    """`cfg` with `min_regions` raised to what the objective needs (LatentMIM: a visible and a
    target region), so a too-small slide is filtered before training, never met inside a step."""
    needed = int(getattr(getattr(spec, "objective_cls", None), "min_regions", 1))
    if cfg.precrop_regions and cfg.precrop_regions < needed:
        raise LaunchError(f"{spec.name} needs at least {needed} regions per slide; --precrop-regions "
                          f"{cfg.precrop_regions} would leave fewer")
    if cfg.min_regions >= needed:
        return cfg
    notes.append(f"{spec.name} needs slides of at least {needed} regions: min_regions {cfg.min_regions} → {needed}")
    return replace(cfg, min_regions=needed)


def _requires_labels(spec: ObjectiveSpec) -> bool:
    """Whether the objective trains on labelled slides only (its class says; supervised does)."""
    from trainer.objectives.base import Objective

    cls = getattr(spec, "objective_cls", None)
    if isinstance(cls, type) and issubclass(cls, Objective):
        return bool(cls.requires_labels)
    return spec.needs_head


def _largest_step_regions(train_ds: Any, cfg: DataConfig) -> int:
    """Regions of the largest training sample after the region cap (× the micro-batch)."""
    counts = getattr(train_ds, "n_regions", None)
    largest = int(max(counts)) if counts is not None and len(counts) else 1
    if cfg.precrop_regions:
        largest = min(largest, cfg.precrop_regions)
    return largest * cfg.batch_size


def store_datasets(
    cfg: DataConfig, label_map: dict[str, int] | None, requires_labels: bool, notes: list[str]
) -> tuple[Any, Any, int, float]:
    """Training and validation sets over one or several stores: (train, val or None, region px, µm/px)."""
    from pipeline.schema.errors import TileStoreError
    from trainer.data.labels import build_label_map
    from trainer.data.multi_store import StoreMismatch, StoreUnion
    from trainer.data.tile_dataset import TileStoreDataset

    stores = cfg.stores()
    for store in stores:
        if "://" not in store and not os.path.exists(store):
            raise LaunchError(f"store {store!r} does not exist")
    common = dict(min_regions=cfg.min_regions, max_regions=cfg.max_regions, val_fraction=cfg.val_fraction,
                  split_seed=cfg.split_seed)
    train_split, val_split = cfg.train_split, cfg.val_split
    if cfg.fold is not None:
        train_split, val_split = "train", "val"

    def open_split(store: str, split: str | None, labels: dict[str, int] | None) -> TileStoreDataset:
        try:
            assignment = fold_assignment(store, cfg, requires_labels) if cfg.fold is not None else None
            return TileStoreDataset(store, split=split, require_label=requires_labels, label_map=labels,
                                    split_assignment=assignment, **common)
        except TileStoreError as exc:
            raise LaunchError(f"cannot open store {store!r}: {exc}") from None
        except ValueError as exc:
            raise LaunchError(f"store {store!r}, split {split!r}: {exc}") from None

    if label_map is None and len(stores) > 1:  # one label map over every store's labels
        tables = [open_split(s, None, None).table for s in stores]
        labels = [v for t in tables if "label" in t.columns for v in t["label"]]
        label_map = build_label_map(labels)
    trains = [open_split(s, train_split, label_map) for s in stores]
    label_map = dict(trains[0].label_map)
    if requires_labels and not label_map:
        raise LaunchError(
            f"store {stores[0]!r} has no slide labels; this objective needs a 'label' column in the manifest "
            "the store was built from"
        )
    try:
        train_ds = trains[0] if len(trains) == 1 else StoreUnion(trains)
    except StoreMismatch as exc:
        raise LaunchError(str(exc)) from None
    if len(train_ds) == 0:
        what = "labelled slides" if requires_labels else "slides"
        report = ", ".join(f"{k}: {v}" for k, v in getattr(train_ds, "filter_report", {}).items())
        raise LaunchError(
            f"store {train_ds.url!r} has no {what} in split {train_split!r} with "
            f"{cfg.min_regions}..{cfg.max_regions} regions ({report})"
        )
    val_ds = None
    if val_split:
        available = getattr(train_ds, "available_splits", None)
        if available is not None and val_split not in available:
            raise LaunchError(
                f"validation split {val_split!r} is not in the store; its splits are "
                f"{', '.join(repr(s) for s in available) or 'none'} (use --val-split NAME, or "
                "--set data.val_split=\"\" to train without validation)"
            )
        vals = [open_split(s, val_split, label_map) for s in stores]
        val_ds = vals[0] if len(vals) == 1 else StoreUnion(vals)
    if not requires_labels and train_ds.label_map:
        unlabelled = int((train_ds.labels < 0).sum())
        if unlabelled:
            notes.append(f"{unlabelled} of {len(train_ds)} training slides have no label (this objective needs none)")
    attrs = train_ds.store_attrs
    return train_ds, val_ds, int(attrs.region_size), float(attrs.mpp)


def fold_assignment(store: str, cfg: DataConfig, requires_labels: bool) -> dict[str, str]:
    """{slide_id: "train" | "val"} for fold `cfg.fold` of a case-grouped `cfg.folds`-fold split."""
    from pipeline.schema.reader import open_store
    from trainer.data.labels import normalize_label
    from trainer.data.splits import by_slide, kfold

    table = open_store(store if "://" in store else os.path.abspath(store)).slides.reset_index(drop=True)
    n = table["n_regions"].astype(int)
    table = table[(n >= cfg.min_regions) & (n <= cfg.max_regions)]
    if requires_labels and "label" in table.columns:
        table = table[table["label"].map(normalize_label).notna()]
    table = table.reset_index(drop=True)
    assert cfg.fold is not None
    return by_slide(table, kfold(table, cfg.folds, cfg.fold, seed=cfg.split_seed))


def folder_datasets(cfg: DataConfig, recipe: dict[str, Any], seed: int, label_map: dict[str, int] | None):
    """Image-folder mode: (train, val or None, region px, None)."""
    from trainer.data.image_folder import ImageFolderDataset

    try:
        augment, mix = augment_configs(recipe)
        train_ds = ImageFolderDataset(cfg.image_folder, train=True, region_size=cfg.region_size, augment=augment,
                                      mix=mix, label_map=label_map, seed=seed)
        val_ds = (
            ImageFolderDataset(cfg.val_folder, train=False, region_size=cfg.region_size,
                               label_map=train_ds.label_map, seed=seed)
            if cfg.val_folder else None
        )
    except (RecipeError, ValueError, FileNotFoundError) as exc:
        raise LaunchError(str(exc)) from None
    return train_ds, val_ds, cfg.region_size, None


def augment_configs(recipe: dict[str, Any]):
    """[augment] → (TrainAugmentConfig, MixConfig or None); [augment.mix] absent = no Mixup/CutMix."""
    from trainer.data.augment import MixConfig, TrainAugmentConfig

    augment_table = dict(recipe.get("augment") or {})
    mix_table = augment_table.pop("mix", None)
    augment = section({"augment": augment_table}, "augment", TrainAugmentConfig)
    mix = section({"augment.mix": mix_table}, "augment.mix", MixConfig) if mix_table is not None else None
    return augment, mix


def build_model(name: str, overrides: dict[str, Any]):
    from trainer.models import build_model as build, list_models

    if name not in list_models():
        raise LaunchError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    try:
        return build(name, **overrides)
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"cannot build model {name!r}: {exc}") from None


def init_encoder(model: torch.nn.Module, model_name: str, payload: Mapping[str, Any], normalization: dict) -> str:
    """--init: copy the checkpoint's exported encoder ("model") into `model`, head left fresh; returns a note."""
    theirs = payload.get("model_name")
    try:
        ckpt.check_normalization(dict(payload), mean=normalization["mean"], std=normalization["std"])
        report = ckpt.load_encoder_weights(model, payload["model"])
    except ckpt.CheckpointError as exc:
        if theirs and theirs != model_name:
            raise LaunchError(
                f"--init: the checkpoint holds a {theirs} encoder, this run builds {model_name}; "
                f"pass --model {theirs} (or set name = \"{theirs}\" in the recipe's [model])"
            ) from None
        raise LaunchError(f"--init: {exc}") from None
    source = payload.get("model_source", "encoder")
    return (
        f"--init: loaded encoder weights; fresh head ({len(report['skipped'])} head keys left out); "
        f"missing {report['missing'] or 'none'}; unexpected {report['unexpected'] or 'none'} "
        f"(the checkpoint's {source}, {theirs or 'unnamed variant'})"
    )
