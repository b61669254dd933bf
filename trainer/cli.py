"""`pm-train`: train Pixel-Mamba on a tile store (or an image folder).

    pm-train supervised --store tiles/demo/mag5.zarr --out runs/demo --config configs/demo_cpu.toml
    pm-train supervised --image-folder imagenet/train --val-folder imagenet/val --out runs/in1k \
        --config configs/imagenet_pretrain.toml
    torchrun --nproc_per_node 8 -m trainer.cli supervised --store ... --out ...

The CLI only wires things together: recipe (+ flags) → datasets → model →
objective → `trainer.engine.loop.Trainer`. Bad input ends with a one-line
error (click.ClickException), not a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import torch

from trainer.engine import checkpoint as ckpt
from trainer.engine.config import DataConfig, RecipeError, apply_overrides, load_recipe, plain, section
from trainer.engine.distributed import DistEnv, init_distributed, shutdown_distributed
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, NonFiniteLossError, Trainer
from trainer.engine.optim import OptimConfig
from trainer.objectives.supervised import SupervisedConfig, SupervisedObjective

DEVICES = ("auto", "cpu", "cuda")
SSM_BACKENDS = ("auto", "torch", "numba", "cuda", "triton")


@click.group()
def main() -> None:
    """Train Pixel-Mamba slide encoders from tile stores."""


def resolve_device(name: str) -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


@main.command()
@click.option("--store", type=str, default=None, help="Tile store (path or URL) to train on; slide mode.")
@click.option("--image-folder", type=str, default=None,
              help="ImageNet-style folder (class sub-folders); one region per image, Region Fusion off.")
@click.option("--val-folder", type=str, default=None, help="Validation image folder (image-folder mode).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoints (last.pt, best.pt), metrics.csv, tensorboard/.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe (TOML) under configs/; flags override it.")
@click.option("--model", type=str, default=None, help="Model variant (default pixel_mamba_6m).")
@click.option("--epochs", type=int, default=None, help="Training epochs; the schedules span them.")
@click.option("--max-steps", type=int, default=None,
              help="Stop after this many optimizer steps (schedules still span --epochs, so --resume continues).")
@click.option("--accum", type=int, default=None, help="Slides per optimizer step per process (default 8).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue a run exactly from its checkpoint (its recipe is the base; flags override).")
@click.option("--init", "init_path", type=click.Path(dir_okay=False), default=None,
              help="Initialise the encoder from a checkpoint (ImageNet or SSL); the head starts fresh.")
@click.option("--ssm-backend", type=click.Choice(SSM_BACKENDS), default=None, help="Selective-scan backend.")
@click.option("--checkpoint-layers", type=int, default=None,
              help="Activation-checkpoint the first K layers (saves memory on large slides).")
@click.option("--val-split", type=str, default=None, help="Validation split name in the slide table (default val).")
@click.option("--balance-classes/--no-balance-classes", default=None, help="Class-balanced slide sampling.")
@click.option("--seed", type=int, default=None, help="Seed of sampling, initialisation and augmentation.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Start a new run in a --out folder that already holds one (its checkpoints are replaced).")
def supervised(**options: Any) -> None:
    """Supervised slide classification (cross-entropy on slide labels; QWK/accuracy validation)."""
    try:
        run_supervised(**options)
    except NonFiniteLossError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        shutdown_distributed()


def _recipe(options: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    overrides = {
        "model.name": options["model"],
        "model.ssm_backend": options["ssm_backend"],
        "model.checkpoint_layers": options["checkpoint_layers"],
        "loop.epochs": options["epochs"],
        "loop.max_steps": options["max_steps"],
        "loop.accum_steps": options["accum"],
        "loop.seed": options["seed"],
        "optim.lr": options["lr"],
        "optim.weight_decay": options["weight_decay"],
        "data.store": options["store"],
        "data.image_folder": options["image_folder"],
        "data.val_folder": options["val_folder"],
        "data.val_split": options["val_split"],
        "data.balance_classes": options["balance_classes"],
        "data.workers": options["workers"],
    }
    if options["weight_decay"] is not None:
        overrides["optim.weight_decay_end"] = options["weight_decay"]
    return apply_overrides(base, overrides)


def run_supervised(**options: Any) -> Path:
    """The body of `pm-train supervised`; returns the run folder."""
    existing = Path(options["out_dir"]) / "last.pt"
    if existing.exists() and not options["resume"] and not options.get("overwrite"):
        raise click.ClickException(
            f"{options['out_dir']} already holds a run ({existing.name}); continue it with "
            f"--resume {existing}, or pass --overwrite to start a new run there"
        )
    resume_payload = _load(options["resume"], "--resume") if options["resume"] else None
    init_payload = _load(options["init_path"], "--init") if options["init_path"] else None
    try:
        file_recipe = load_recipe(options["config_path"])
        base = dict(resume_payload.get("config") or {}) if resume_payload else {}
        base = apply_overrides(base, _flatten(file_recipe)) if file_recipe else base
        recipe = _recipe(options, base)
        data_cfg = section(recipe, "data", DataConfig)
        optim_cfg = section(recipe, "optim", OptimConfig)
        loop_cfg = section(recipe, "loop", LoopConfig)
        sup_cfg = section(recipe, "supervised", SupervisedConfig)
    except RecipeError as exc:
        raise click.ClickException(str(exc)) from None
    if bool(data_cfg.store) == bool(data_cfg.image_folder):
        raise click.ClickException("give exactly one of --store (slides) or --image-folder (images)")

    device = resolve_device(options["device"])
    env = init_distributed(device)
    torch.manual_seed(loop_cfg.seed)
    label_map = resume_payload.get("label_map") if resume_payload else None
    if data_cfg.store:
        train_ds, val_ds, region_size, mpp = _store_datasets(data_cfg, label_map)
    else:
        train_ds, val_ds, region_size, mpp = _folder_datasets(data_cfg, recipe, loop_cfg.seed, label_map)
    label_map = dict(train_ds.label_map)

    for payload, what in ((resume_payload, "--resume"), (init_payload, "--init")):
        if payload is not None:
            try:
                ckpt.check_store_matches(payload, region_size=region_size, mpp=mpp, require_mpp=what == "--resume")
            except ckpt.StoreMismatchError as exc:
                raise click.ClickException(f"{what}: {exc}") from None

    model_section = dict(recipe.get("model") or {})
    model_name = model_section.pop("name", "pixel_mamba_6m")
    overrides = {**model_section, "region_size": region_size, "num_classes": max(label_map.values()) + 1}
    if data_cfg.image_folder:
        overrides["region_fusion"] = False
    model = _build_model(model_name, overrides)
    normalization = {"mean": list(model.config.pixel_mean), "std": list(model.config.pixel_std)}
    if resume_payload is not None:
        try:
            ckpt.check_normalization(resume_payload, mean=normalization["mean"], std=normalization["std"])
        except ckpt.CheckpointError as exc:
            raise click.ClickException(f"--resume: {exc}") from None
    if init_payload is not None:
        _init_encoder(model, init_payload, normalization, env)

    try:
        objective = SupervisedObjective(model, label_map=label_map, config=sup_cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    train_feed = SlideFeed(
        train_ds, env=env, shuffle=True, balance=data_cfg.balance_classes, seed=loop_cfg.seed,
        workers=data_cfg.workers, labels=getattr(train_ds, "labels", None), pin_memory=device.type == "cuda",
    )
    val_feed = (
        SlideFeed(val_ds, env=env, shuffle=False, seed=loop_cfg.seed, workers=data_cfg.workers)
        if val_ds is not None and len(val_ds) else None
    )
    meta = {
        "config": plain(recipe),
        "model_name": model_name,
        "model_overrides": plain(overrides),
        "model_config": json.loads(json.dumps(plain(model.config))),
        "region_size": int(region_size),
        "mpp": None if mpp is None else float(mpp),
        "magnification": None if mpp is None else float(10.0 / mpp),
        "normalization": normalization,
        "data_source": data_cfg.store or data_cfg.image_folder,
    }
    out_dir = Path(options["out_dir"])
    try:
        trainer = Trainer(
            objective, train=train_feed, val=val_feed, optim_config=optim_cfg, loop_config=loop_cfg,
            out_dir=out_dir, device=device, env=env, checkpoint_meta=meta,
        )
        if env.is_main:
            _describe(trainer, train_ds, val_ds, model_name, device, env)
        result = trainer.fit(resume=resume_payload)
    except (ckpt.CheckpointError, KeyError) as exc:
        raise click.ClickException(str(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
    if env.is_main:
        click.echo(f"run folder:        {out_dir.resolve()}")
        click.echo(f"metrics (CSV):     {(out_dir / 'metrics.csv').resolve()}")
        click.echo(f"TensorBoard logs:  {(out_dir / 'tensorboard').resolve()}")
        click.echo(f"last checkpoint:   {result.last_checkpoint.resolve() if result.last_checkpoint else '-'}")
        if result.best_checkpoint:
            best = trainer.state.best_value
            score = f" ({result.best_metric} {best:.4f})" if best is not None else ""
            click.echo(f"best checkpoint:   {result.best_checkpoint.resolve()}{score}")
    return out_dir


def _flatten(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables → dotted keys ({"loop": {"epochs": 3}} → {"loop.epochs": 3})."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _load(path: str, flag: str) -> dict[str, Any]:
    try:
        return ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise click.ClickException(f"{flag}: {exc}") from None


def _store_datasets(cfg: DataConfig, label_map: dict[str, int] | None):
    from pipeline.schema.errors import TileStoreError
    from trainer.data.tile_dataset import TileStoreDataset

    store = cfg.store
    assert store is not None
    if "://" not in store and not os.path.exists(store):
        raise click.ClickException(f"store {store!r} does not exist")
    common = dict(min_regions=cfg.min_regions, max_regions=cfg.max_regions, val_fraction=cfg.val_fraction,
                  split_seed=cfg.split_seed)
    try:
        train_ds = TileStoreDataset(store, split=cfg.train_split, require_label=True, label_map=label_map, **common)
    except TileStoreError as exc:
        raise click.ClickException(f"cannot open store {store!r}: {exc}") from None
    except ValueError as exc:
        raise click.ClickException(f"store {store!r}: {exc}") from None
    if not train_ds.label_map:
        raise click.ClickException(
            f"store {store!r} has no slide labels; a supervised run needs a 'label' column in the manifest "
            "the store was built from"
        )
    if len(train_ds) == 0:
        raise click.ClickException(
            f"store {store!r} has no labelled slides in split {cfg.train_split!r} with "
            f"{cfg.min_regions}..{cfg.max_regions} regions "
            f"({', '.join(f'{k}: {v}' for k, v in getattr(train_ds, 'filter_report', {}).items())})"
        )
    val_ds = None
    if cfg.val_split:
        try:
            val_ds = TileStoreDataset(store, split=cfg.val_split, require_label=True, label_map=train_ds.label_map,
                                      **common)
        except ValueError as exc:
            raise click.ClickException(f"store {store!r}, split {cfg.val_split!r}: {exc}") from None
    attrs = train_ds.store_attrs
    return train_ds, val_ds, int(attrs.region_size), float(attrs.mpp)


def _folder_datasets(cfg: DataConfig, recipe: dict[str, Any], seed: int, label_map: dict[str, int] | None):
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
        raise click.ClickException(str(exc)) from None
    return train_ds, val_ds, cfg.region_size, None


def augment_configs(recipe: dict[str, Any]):
    """[augment] → (TrainAugmentConfig, MixConfig or None); [augment.mix] absent = no Mixup/CutMix."""
    from trainer.data.augment import MixConfig, TrainAugmentConfig

    augment_table = dict(recipe.get("augment") or {})
    mix_table = augment_table.pop("mix", None)
    augment = section({"augment": augment_table}, "augment", TrainAugmentConfig)
    mix = section({"augment.mix": mix_table}, "augment.mix", MixConfig) if mix_table is not None else None
    return augment, mix


def _build_model(name: str, overrides: dict[str, Any]):
    from trainer.models import build_model, list_models

    if name not in list_models():
        raise click.ClickException(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    try:
        return build_model(name, **overrides)
    except (TypeError, ValueError) as exc:
        raise click.ClickException(f"cannot build model {name!r}: {exc}") from None


def _init_encoder(model: torch.nn.Module, payload: dict[str, Any], normalization: dict, env: DistEnv) -> None:
    try:
        ckpt.check_normalization(payload, mean=normalization["mean"], std=normalization["std"])
        report = ckpt.load_encoder_weights(model, payload["model"])
    except ckpt.CheckpointError as exc:
        raise click.ClickException(f"--init: {exc}") from None
    if env.is_main:
        click.echo(
            f"--init: loaded encoder weights; fresh head ({len(report['skipped'])} head keys left out); "
            f"missing {report['missing'] or 'none'}; unexpected {report['unexpected'] or 'none'}"
        )


def _describe(trainer: Trainer, train_ds, val_ds, model_name: str, device: torch.device, env: DistEnv) -> None:
    n_params = sum(p.numel() for p in trainer.objective.encoder.parameters())
    click.echo(
        f"{model_name} ({n_params / 1e6:.2f}M params) on {device} × {env.world_size}; "
        f"{len(train_ds)} training slides, {len(val_ds) if val_ds is not None else 0} validation; "
        f"{trainer.steps_per_epoch} steps/epoch × {trainer.config.epochs} epochs "
        f"(effective batch {trainer.config.accum_steps * env.world_size}), amp {trainer.amp_dtype or 'off'}"
    )


if __name__ == "__main__":
    sys.exit(main())
