"""The training loop: one loop for every objective.

One slide per micro-step; `accum_steps` micro-steps (per rank) make one
optimizer step, so the effective batch is accum_steps × world_size slides
(the thesis: 8 slides per GPU). Per step, in order: schedule values at the step
are set on the optimizer; each micro-step runs `objective(sample, step_ctx=...)`
under autocast and back-propagates loss / group_size (DDP syncs gradients on
the group's last micro-step only); the group's losses are averaged over ranks
and checked (a non-finite loss stops the run, naming the step and slide, before
the optimizer touches the weights); gradients are unscaled, the objective's
`on_before_optimizer_step` runs, the norm is clipped, AdamW steps,
`on_after_step` runs (EMA teachers); then logging and periodic checkpoints.
At each epoch's end the objective validates and `last.pt` (and `best.pt` when
the chosen metric improved) are written.

Exact resume: the checkpoint stores step, epoch and the rank's position in the
epoch, the RNG states, optimizer and scaler; samples are drawn per (seed,
epoch, position, rank) and validation runs inside a forked RNG, so a resumed run
on CPU reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from trainer.engine import checkpoint as ckpt
from trainer.engine.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    maybe_no_sync,
    unwrap,
    wrap_ddp,
)
from trainer.engine.optim import OptimConfig, apply_schedule_values, build_adamw, param_groups
from trainer.engine.run_log import RunLogger
from trainer.engine.schedules import CosineSchedule, cosine_from_epochs
from trainer.objectives.base import HookContext, Objective, StepContext, TrainingPlan, move_sample

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Loop settings.

    epochs: passes over the training set; the schedules span all of them.
    max_steps: stop after this many optimizer steps (the schedules still span
        `epochs`, so a later `--resume` continues the same curves); None = no limit.
    accum_steps: slides per rank per optimizer step.
    clip_grad: max gradient L2 norm (None or 0: no clipping).
    amp: "auto" (bf16 where the GPU supports it, else fp16), "bf16", "fp16" or
        "none"; always fp32 on CPU.
    checkpoint_every: also write `last.pt` every this many optimizer steps (0: only
        at epoch ends and at the end).
    best_metric: validation metric that picks `best.pt` (None: the objective's default).
    """

    epochs: int = 1
    max_steps: int | None = None
    accum_steps: int = 8
    clip_grad: float | None = 3.0
    amp: str = "auto"
    checkpoint_every: int = 0
    log_every: int = 1
    seed: int = 0
    best_metric: str | None = None
    validate_every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("log_every", "validate_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: only at epoch ends), got {self.checkpoint_every}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0 or None: no clipping), got {self.clip_grad}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")


class EpochSource(Protocol):
    """What the loop iterates: this rank's samples of an epoch (see `trainer.engine.feed.SlideFeed`)."""

    def __len__(self) -> int: ...

    def iterate(self, epoch: int, start_index: int = 0) -> Iterable[Mapping[str, Any]]: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped before the optimizer step."""


@dataclass(kw_only=True)
class TrainState:
    """Where the run is: optimizer steps done, current epoch, samples of it consumed (this rank)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_value: float | None = None


@dataclass(kw_only=True)
class FitResult:
    """What `fit` returns: per-step train rows, per-epoch val rows, checkpoint paths."""

    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    state: TrainState = field(default_factory=TrainState)
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    best_metric: str | None = None


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `amp` on `device`; None = fp32."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":  # native bf16 (Ampere+); pre-Ampere GPUs only emulate it (slowly): fp16 + GradScaler there
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def best_mode_for(metric: str | None, objective: Objective) -> str:
    """"min" or "max" for the metric that picks `best.pt`.

    The objective's `best_mode` describes its `default_best_metric`; a loss chosen
    instead ("loss", "*_loss") improves downwards, any other metric upwards.
    """
    if metric is not None and (metric == "loss" or metric.endswith("_loss")):
        return "min"
    if metric == objective.default_best_metric:
        return objective.best_mode
    return "max"


def sample_generator(seed: int, epoch: int, position: int, rank: int) -> torch.Generator:
    """CPU generator for one sample's randomness, a function of where it sits in the run."""
    state = np.random.SeedSequence([seed, epoch, position, rank]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class Trainer:
    """Drives `objective` over `train` (and validates on `val`) with AdamW and checkpoints.

    checkpoint_meta: plain-data entries every checkpoint carries (config, label_map,
    region_size, mpp, normalization, model_name, model_config, objective_name).
    """

    def __init__(
        self,
        objective: Objective,
        *,
        train: EpochSource,
        val: EpochSource | None,
        optim_config: OptimConfig,
        loop_config: LoopConfig,
        out_dir: str | Path,
        device: torch.device,
        env: DistEnv = DistEnv(),
        checkpoint_meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.objective = objective.to(device)
        self.train_source = train
        self.val_source = val
        self.optim_config = optim_config
        self.config = loop_config
        self.out_dir = Path(out_dir)
        self.device = device
        self.env = env
        self.meta = dict(checkpoint_meta or {})
        self.samples_per_epoch = len(train)
        if self.samples_per_epoch < 1:
            raise ValueError("the training set is empty: no slide passed the filters")
        self.steps_per_epoch = math.ceil(self.samples_per_epoch / loop_config.accum_steps)
        self.plan = TrainingPlan(
            total_steps=loop_config.epochs * self.steps_per_epoch,
            steps_per_epoch=self.steps_per_epoch,
            epochs=loop_config.epochs,
        )
        self.schedules = self._build_schedules()
        self.module = wrap_ddp(self.objective, env, device, find_unused=objective.find_unused_parameters)
        self.optimizer = build_adamw(self._param_groups(), optim_config)
        self.amp_dtype = resolve_amp(loop_config.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.best_metric = loop_config.best_metric or objective.default_best_metric
        self.best_mode = best_mode_for(self.best_metric, objective)
        self.state = TrainState()

    # ----------------------------------------------------------------- set-up
    def _build_schedules(self) -> dict[str, CosineSchedule]:
        cfg = self.optim_config
        scale = 1.0
        if cfg.lr_scale_batch > 0:
            scale = self.config.accum_steps * self.env.world_size / cfg.lr_scale_batch
        common = dict(epochs=self.config.epochs, steps_per_epoch=self.steps_per_epoch)
        warmup_epochs = cfg.warmup_epochs
        if cfg.warmup_steps is not None:
            warmup_epochs = cfg.warmup_steps / self.steps_per_epoch
        schedules = {
            "lr": cosine_from_epochs(
                base=cfg.lr * scale,
                final=cfg.min_lr * scale,
                warmup_epochs=warmup_epochs,
                warmup_start=cfg.warmup_lr,
                **common,
            ),
            "weight_decay": cosine_from_epochs(
                base=cfg.weight_decay,
                final=cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end,
                **common,
            ),
        }
        extra = self.objective.schedules(self.plan)
        clash = set(extra) & set(schedules)
        if clash:
            raise ValueError(f"objective schedules may not redefine the engine's: {sorted(clash)}")
        return {**schedules, **extra}

    def _param_groups(self) -> list[dict]:
        groups = param_groups(self.objective, extra_no_decay=self.objective.no_weight_decay_names())
        hints = self.objective.param_group_hints()
        if not hints:
            return groups
        named = {id(p): n for n, p in self.objective.named_parameters()}
        out: list[dict] = []
        for group in groups:
            plain = [p for p in group["params"] if named[id(p)] not in hints]
            if plain:
                out.append({**group, "params": plain})
            for p in group["params"]:
                name = named[id(p)]
                if name in hints:
                    out.append({**group, "name": name, "params": [p], **hints[name]})
        return out

    # ------------------------------------------------------------- checkpoints
    def state_payload(self) -> dict[str, Any]:
        """Everything a checkpoint holds (plain data and tensors only)."""
        objective = unwrap(self.module)
        return {
            "format": ckpt.CHECKPOINT_FORMAT,
            "version": ckpt.CHECKPOINT_VERSION,
            **self.meta,
            "model": objective.encoder.state_dict(),
            "objective_name": objective.name,
            "objective": objective.objective_state_dict(),
            **objective.checkpoint_extras(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "position": self.state.position,
            "world_size": self.env.world_size,
            "samples_per_epoch": self.samples_per_epoch,
            "rng": ckpt.capture_rng_state(),
            "metrics": {"best_metric": self.best_metric, "best_value": self.state.best_value},
        }

    def load_state(self, payload: Mapping[str, Any]) -> None:
        """Resume from a checkpoint payload (as read by `checkpoint.load_checkpoint`)."""
        if int(payload.get("world_size", 1)) != self.env.world_size:
            raise ckpt.CheckpointError(
                f"checkpoint was written by a run on {payload.get('world_size')} processes; resume it "
                f"with the same number (this run has {self.env.world_size})"
            )
        if int(payload.get("samples_per_epoch", self.samples_per_epoch)) != self.samples_per_epoch:
            raise ckpt.CheckpointError(
                f"checkpoint's epochs had {payload['samples_per_epoch']} samples per rank, this run's have "
                f"{self.samples_per_epoch}: the training set or its filters changed"
            )
        objective = unwrap(self.module)
        try:
            objective.encoder.load_state_dict(payload["model"])
            objective.load_objective_state_dict(payload["objective"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(
                f"checkpoint does not fit this run (another model variant or objective?): {exc}"
            ) from exc
        if payload.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(payload["scaler"])
        metrics = payload.get("metrics") or {}
        # a best value of another metric (the recipe's best_metric changed) is no yardstick for this one
        same_metric = metrics.get("best_metric", self.best_metric) == self.best_metric
        self.state = TrainState(
            step=int(payload["step"]),
            epoch=int(payload["epoch"]),
            position=int(payload["position"]),
            best_value=metrics.get("best_value") if same_metric else None,
        )
        ckpt.restore_rng_state(payload["rng"])

    def _save(self, name: str) -> Path | None:
        path = None
        if self.env.is_main:
            path = ckpt.atomic_save(self.state_payload(), self.out_dir / name)
        barrier(self.env)
        return path

    # -------------------------------------------------------------------- run
    def fit(self, *, resume: Mapping[str, Any] | None = None) -> FitResult:
        """Train until `epochs` are done or `max_steps` reached; returns the history and checkpoints."""
        if resume is not None:
            self.load_state(resume)
        cfg = self.config
        stop_at = self.plan.total_steps if cfg.max_steps is None else min(cfg.max_steps, self.plan.total_steps)
        logger = RunLogger(
            self.out_dir,
            enabled=self.env.is_main,
            total_steps=stop_at,
            start_step=self.state.step,
            tensorboard=cfg.tensorboard,
            progress=cfg.progress,
        )
        result = FitResult(state=self.state, best_metric=self.best_metric)
        last_saved_step = self.state.step if resume is not None else -1
        try:
            while self.state.step < stop_at and self.state.epoch < cfg.epochs:
                source = iter(self.train_source.iterate(self.state.epoch, self.state.position))
                while self.state.position < self.samples_per_epoch and self.state.step < stop_at:
                    row = self._optimizer_step(source)
                    result.history.append(row)
                    if self.state.step % cfg.log_every == 0 or self.state.step == stop_at:
                        logger.log("train", self.state.step, self.state.epoch, row)
                    if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                        result.last_checkpoint = self._save(ckpt.LAST)
                        last_saved_step = self.state.step
                if self.state.position >= self.samples_per_epoch:
                    self._end_epoch(logger, result)
                    last_saved_step = self.state.step
            if last_saved_step != self.state.step:
                result.last_checkpoint = self._save(ckpt.LAST)
        finally:
            logger.close()
        if result.last_checkpoint is None and (self.out_dir / ckpt.LAST).exists():
            result.last_checkpoint = self.out_dir / ckpt.LAST
        if (self.out_dir / ckpt.BEST).exists():
            result.best_checkpoint = self.out_dir / ckpt.BEST
        result.state = self.state
        return result

    def _end_epoch(self, logger: RunLogger, result: FitResult) -> None:
        finished = self.state.epoch
        self.state.epoch += 1
        self.state.position = 0
        improved = False
        due = (finished + 1) % self.config.validate_every == 0 or finished + 1 == self.config.epochs
        if self.val_source is not None and due:
            metrics = self.validate()
            if metrics:
                logger.log("val", self.state.step, finished, metrics)
                result.validations.append({"epoch": finished, "step": self.state.step, **metrics})
                improved = self._is_better(metrics)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                logger.message(f"epoch {finished}: {shown}")
        result.last_checkpoint = self._save(ckpt.LAST)
        if improved and self.env.is_main:
            result.best_checkpoint = ckpt.atomic_copy(self.out_dir / ckpt.LAST, self.out_dir / ckpt.BEST)

    def _is_better(self, metrics: Mapping[str, float]) -> bool:
        if self.best_metric is None:
            return False
        if self.best_metric not in metrics:
            raise KeyError(
                f"best metric {self.best_metric!r} is not among the validation metrics ({', '.join(metrics)})"
            )
        value = float(metrics[self.best_metric])
        best = self.state.best_value
        better = best is None or (value > best if self.best_mode == "max" else value < best)
        if better and math.isfinite(value):
            self.state.best_value = value
            return True
        return False

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _optimizer_step(self, source: Iterator[Mapping[str, Any]]) -> dict[str, float]:
        cfg = self.config
        step = self.state.step
        group_size = min(cfg.accum_steps, self.samples_per_epoch - self.state.position)
        values = {name: schedule(step) for name, schedule in self.schedules.items()}
        apply_schedule_values(self.optimizer, lr=values["lr"], weight_decay=values["weight_decay"])
        self.module.train()
        started = time.perf_counter()
        loss_sum = 0.0
        metric_sums: dict[str, float] = {}
        bad_slides: list[str] = []
        for micro in range(group_size):
            sample = next(source)
            position = self.state.position
            ctx = StepContext(
                step=step,
                epoch=self.state.epoch,
                position=position,
                micro_step=micro,
                accum_steps=group_size,
                device=self.device,
                values=values,
                generator=sample_generator(cfg.seed, self.state.epoch, position, self.env.rank),
            )
            with maybe_no_sync(self.module, skip_sync=micro < group_size - 1):
                with self._autocast():
                    out = self.module(move_sample(sample, self.device), step_ctx=ctx)
                loss = out["loss"]
                self.scaler.scale(loss.float() / group_size).backward()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                bad_slides.append(str(sample.get("slide_id", f"sample {position}")))
            loss_sum += loss_value
            for key, value in out.items():
                if key != "loss":
                    metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
            self.state.position += 1
        keys = sorted(metric_sums)
        totals = all_reduce_sum(
            torch.tensor([loss_sum, float(group_size), float(len(bad_slides))] + [metric_sums[k] for k in keys],
                         dtype=torch.float64),
            self.env,
        )
        if totals[2] > 0 or not math.isfinite(float(totals[0])):
            self._stop_non_finite(step, bad_slides)
        self.scaler.unscale_(self.optimizer)
        objective = unwrap(self.module)
        hook_ctx = HookContext(
            step=step, epoch=self.state.epoch, plan=self.plan, values=values,
            rank=self.env.rank, world_size=self.env.world_size,
            all_reduce_sum=lambda t: all_reduce_sum(t, self.env),
        )
        objective.on_before_optimizer_step(hook_ctx)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if cfg.clip_grad:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        objective.on_after_step(hook_ctx)
        self.state.step += 1
        elapsed = max(time.perf_counter() - started, 1e-9)
        count = float(totals[1])
        row = {
            "loss": float(totals[0]) / count,
            **{k: float(totals[3 + i]) / count for i, k in enumerate(keys)},
            **values,
            "grad_norm": grad_norm,
            "slides_per_s": count / elapsed,
        }
        return row

    def _stop_non_finite(self, step: int, bad_slides: list[str]) -> None:
        everywhere = [s for rank_slides in all_gather_objects(bad_slides, self.env) for s in rank_slides]
        self.optimizer.zero_grad(set_to_none=True)
        where = ", ".join(repr(s) for s in everywhere) or "unknown (the sum over ranks overflowed)"
        raise NonFiniteLossError(
            f"non-finite loss at optimizer step {step} (epoch {self.state.epoch}) on slide(s) {where}; "
            f"the run stopped before updating the weights. The last good checkpoint is "
            f"{self.out_dir / ckpt.LAST} (if one was written); resume from it with a lower --lr or "
            "inspect the slide."
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Run the objective's validation over every rank's shard; metrics on all ranks."""
        objective = unwrap(self.module)
        if self.val_source is None or not objective.has_validation:
            return {}
        was_training = objective.training
        objective.eval()
        records: list[dict[str, Any]] = []
        devices = []
        if self.device.type == "cuda":  # "cuda" without an index (torchrun) is this rank's current device
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            for sample in self.val_source.iterate(0, 0):
                with self._autocast():
                    record = objective.validation_step(move_sample(sample, self.device), device=self.device)
                records.append(record)
        objective.train(was_training)
        gathered = [r for part in all_gather_objects(records, self.env) for r in part]
        unique: dict[Any, dict[str, Any]] = {}
        for i, record in enumerate(gathered):
            unique.setdefault(record.get("index", i), record)
        return objective.validation_metrics(list(unique.values()))

