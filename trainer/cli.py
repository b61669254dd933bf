"""`pm-train <objective>`: train Pixel-Mamba on tile stores (or an image folder).

    pm-train supervised --store tiles/demo/mag5.zarr --out runs/demo --config configs/demo_cpu.toml
    pm-train supervised --image-folder imagenet/train --val-folder imagenet/val --out runs/in1k \
        --config configs/imagenet_pretrain.toml
    pm-train <ssl objective> --store panda.zarr --store tcga.zarr --out runs/ssl --set loop.best_metric="rankme"
    torchrun --nproc_per_node 8 -m trainer.cli supervised --store ... --out ...

One command per entry of `trainer.objectives.OBJECTIVES`, all with the same flags;
the objective's own options come from its recipe section `[<name>]` and
`--set <name>.key=value`. The CLI only parses flags and reports: the wiring is
`trainer.launch`. Bad input ends with a one-line error, not a traceback; an error
on one DDP rank ends every rank, and rank 0 prints the one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from trainer.engine import checkpoint as ckpt
from trainer.engine.distributed import init_distributed, shutdown_distributed
from trainer.engine.loop import RankFailure, TrainingInterrupted, TrainingStopped
from trainer.launch import (
    LaunchError,
    augment_configs,
    build_recipe,
    check_out_dir,
    clear_run_folder,
    prepare_run,
)
from trainer.objectives import OBJECTIVES

DEVICES = ("auto", "cpu", "cuda")
SSM_BACKENDS = ("auto", "torch", "numba", "cuda", "triton")
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}

__all__ = ["augment_configs", "main", "resolve_device", "run_objective"]


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


# flag → dotted recipe key (None values are left out)
FLAG_KEYS = {
    "model": "model.name",
    "ssm_backend": "model.ssm_backend",
    "checkpoint_layers": "model.checkpoint_layers",
    "epochs": "loop.epochs",
    "max_steps": "loop.max_steps",
    "accum": "loop.accum_steps",
    "seed": "loop.seed",
    "best_metric": "loop.best_metric",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "image_folder": "data.image_folder",
    "val_folder": "data.val_folder",
    "val_split": "data.val_split",
    "balance_classes": "data.balance_classes",
    "workers": "data.workers",
    "precrop_regions": "data.precrop_regions",
    "batch_size": "data.batch_size",
    "fold": "data.fold",
    "folds": "data.folds",
}


def training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The flags every `pm-train <objective>` command shares."""
    options = [
        click.option("--store", "stores", multiple=True,
                     help="Tile store (path or URL); repeat for several stores of one MPP and region size."),
        click.option("--image-folder", default=None,
                     help="ImageNet-style folder (class sub-folders); one region per image, Region Fusion off."),
        click.option("--val-folder", default=None, help="Validation image folder (image-folder mode)."),
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                     help="Run folder: checkpoints (last.pt, best.pt), metrics.csv, tensorboard/."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="Recipe (TOML) under configs/; flags override it."),
        click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override any recipe key (value read as TOML), e.g. --set loop.amp='\"bf16\"'; repeatable."),
        click.option("--model", default=None, help="Model variant (default pixel_mamba_6m)."),
        click.option("--epochs", type=int, default=None, help="Training epochs; the schedules span them."),
        click.option("--max-steps", type=int, default=None,
                     help="Stop after this many optimizer steps (schedules still span --epochs; a resume may raise it)."),
        click.option("--accum", type=int, default=None, help="Samples per optimizer step per process (default 8)."),
        click.option("--batch-size", type=int, default=None,
                     help="Samples per micro-step for equal-shape samples (image folders); --accum still counts samples."),
        click.option("--lr", type=float, default=None, help="Peak learning rate."),
        click.option("--weight-decay", type=float, default=None, help="AdamW weight decay (constant)."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--resume", type=click.Path(dir_okay=False), default=None,
                     help="Continue a run exactly from its checkpoint (its recipe is the base; flags override)."),
        click.option("--allow-changed-settings", is_flag=True, default=False,
                     help="Let --resume change seed/accumulation/world size/epochs/data: restart at the next epoch."),
        click.option("--init", "init_path", type=click.Path(dir_okay=False), default=None,
                     help="Initialise the encoder from a checkpoint's exported model; a head starts fresh."),
        click.option("--ssm-backend", type=click.Choice(SSM_BACKENDS), default=None, help="Selective-scan backend."),
        click.option("--checkpoint-layers", type=int, default=None,
                     help="Activation-checkpoint the first K layers (saves memory on large slides)."),
        click.option("--precrop-regions", type=int, default=None,
                     help="Cut slides with more regions to a connected neighbourhood of N (0 = off)."),
        click.option("--val-split", default=None, help="Validation split name in the slide table (default val)."),
        click.option("--fold", type=int, default=None, help="Case-grouped cross-validation: validate on fold K (0-based)."),
        click.option("--folds", type=int, default=None, help="Number of cross-validation folds (default 5)."),
        click.option("--best-metric", default=None, help="Validation metric that picks best.pt."),
        click.option("--balance-classes/--no-balance-classes", default=None, help="Class-balanced slide sampling."),
        click.option("--seed", type=int, default=None, help="Seed of sampling, initialisation and augmentation."),
        click.option("--workers", type=int, default=None, help="DataLoader worker processes."),
        click.option("--force", is_flag=True, default=False,
                     help="Train even where the memory estimate says the largest step will not fit."),
        click.option("--overwrite", is_flag=True, default=False,
                     help="Start a new run in a --out folder that already holds one (removes its checkpoints, logs)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _command_for(name: str, summary: str) -> click.Command:
    @training_options
    def command(**options: Any) -> None:
        code = 0
        try:
            code = run_objective(name, **options)
        finally:
            shutdown_distributed()
        if code:
            sys.exit(code)

    command.__doc__ = summary
    return click.command(name=name, help=summary)(command)


def _register_commands() -> None:
    for name, spec_factory in OBJECTIVES.items():
        spec = spec_factory()
        main.add_command(_command_for(name, spec.summary))


def _load(path: str, flag: str) -> dict[str, Any]:
    try:
        return ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise click.ClickException(f"{flag}: {exc}") from None


def run_objective(name: str, **options: Any) -> int:
    """The body of `pm-train <name>`; returns the exit code (0, or 130/143 after SIGINT/SIGTERM)."""
    out_dir = Path(options["out_dir"])
    try:
        check_out_dir(out_dir, resume=bool(options["resume"]), overwrite=options["overwrite"])
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from None
    resume = _load(options["resume"], "--resume") if options["resume"] else None
    init = _load(options["init_path"], "--init") if options["init_path"] else None
    flags = {key: options[flag] for flag, key in FLAG_KEYS.items() if options.get(flag) is not None}
    if options["stores"]:
        flags["data.store"] = list(options["stores"]) if len(options["stores"]) > 1 else options["stores"][0]
    if options["weight_decay"] is not None:
        flags["optim.weight_decay_end"] = options["weight_decay"]
    device = resolve_device(options["device"])
    env = init_distributed(device)
    try:
        recipe = build_recipe(name, config_path=options["config_path"], resume=resume, flags=flags,
                              sets=options["sets"])
        if options["overwrite"] and not resume and env.is_main:
            clear_run_folder(out_dir)
        run = prepare_run(name, recipe, out_dir=out_dir, device=device, env=env, resume=resume, init=init,
                          force=options["force"])
    except LaunchError as exc:
        if not env.is_main:  # every rank hits the same set-up error; rank 0 reports it
            return 1
        raise click.ClickException(str(exc)) from None
    trainer = run.trainer
    if env.is_main:
        for note in run.notes:
            click.echo(note)
        _describe(run, device, env.world_size)
    try:
        result = trainer.fit(resume=resume, allow_changed_settings=options["allow_changed_settings"])
    except TrainingInterrupted as exc:
        if env.is_main:
            click.echo(f"{exc}", err=True)
        return SIGNAL_EXIT_CODES.get(exc.signal_name, 1)
    except RankFailure as exc:
        if env.is_main:
            raise click.ClickException(str(exc)) from None
        return 1
    except (TrainingStopped, ckpt.CheckpointError, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
    if not env.is_main:
        return 0
    if result.already_finished:
        click.echo(
            f"nothing to do: the run in {out_dir} already reached step {trainer.state.step} "
            f"(epoch {trainer.state.epoch}; it stops at step {result.stop_at} of {trainer.plan.total_steps}); "
            "raise --max-steps (or --epochs with --allow-changed-settings) to train further"
        )
        return 0
    click.echo(f"run folder:        {out_dir.resolve()}")
    click.echo(f"metrics (CSV):     {(out_dir / 'metrics.csv').resolve()}")
    click.echo(f"TensorBoard logs:  {(out_dir / 'tensorboard').resolve()}")
    click.echo(f"last checkpoint:   {result.last_checkpoint.resolve() if result.last_checkpoint else '-'}")
    if result.best_checkpoint:
        best = trainer.state.best_value
        score = f" ({result.best_metric} {best:.4f})" if best is not None else ""
        click.echo(f"best checkpoint:   {result.best_checkpoint.resolve()}{score}")
    return 0


def run_supervised(**options: Any) -> int:
    """`pm-train supervised` (kept for callers of the earlier API)."""
    return run_objective("supervised", **options)


def _describe(run: Any, device: torch.device, world_size: int) -> None:
    trainer = run.trainer
    n_params = sum(p.numel() for p in trainer.objective.encoder.parameters())
    click.echo(
        f"{trainer.objective.name}: {run.model_name} ({n_params / 1e6:.2f}M params) on {device} × {world_size}; "
        f"{run.train_size} training samples, {run.val_size} validation; "
        f"{trainer.steps_per_epoch} steps/epoch × {trainer.config.epochs} epochs "
        f"(effective batch {trainer.config.accum_steps * world_size}), amp {trainer.amp_dtype or 'off'}"
    )


_register_commands()

if __name__ == "__main__":
    sys.exit(main())
