"""The training loop: one loop for every objective.

`accum_steps` samples (slides; per rank) make one optimizer step, so the
effective batch is accum_steps × world_size samples (the thesis: 8 slides per
GPU); a micro-step handles one sample, or `batch_size` equal-shape samples packed
together (image folders). Per optimizer step, in order:

1. schedule values at the step are set on the optimizer;
2. each micro-step runs `objective(sample, step_ctx=...)` under autocast and
   back-propagates loss × (samples in it / group size);
3. the ranks exchange a status (loss and metric sums with per-metric counts,
   non-finite losses, errors, stop requests): an error or a non-finite loss on
   any rank stops every rank here, before the weights change;
4. gradients are averaged over ranks (`trainer.engine.distributed`), unscaled,
   `on_before_optimizer_step` runs, the norm is clipped — a non-finite norm stops
   the run where no fp16 GradScaler is active (with one, the scaler skips the
   step; 20 skipped steps in a row stop the run) — and AdamW steps;
5. unless the step was skipped, EMA teachers are updated (`trainer.engine.ema`,
   momentum = the "ema_momentum" schedule); `on_after_step` runs; the objective's
   messages are logged; a SIGINT/SIGTERM received meanwhile ends the run here
   with `last.pt` written (`TrainingInterrupted`).

At each epoch's end `last.pt` is written, the objective validates (if due),
and `last.pt` is rewritten with the metrics; `best.pt` is a copy of it when the
chosen metric improved (never on a NaN).

Exact resume: the checkpoint stores step, epoch and the rank's position in the
epoch, the RNG states, optimizer and scaler; every sample is prepared and run
with generators of (seed, epoch, position, rank, stream) and validation runs
inside a forked RNG, so a resumed run on CPU reproduces the uninterrupted run's
losses. A resume with other data-order or schedule settings is refused (or, with
`allow_changed_settings`, restarts at the next epoch boundary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.data.collate import batch_size_of
from trainer.engine import checkpoint as ckpt
from trainer.engine.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_module,
)
from trainer.engine.ema import MOMENTUM, check_ema_pairs, ema_update
from trainer.engine.interrupt import StopRequest
from trainer.engine.optim import OptimConfig, apply_schedule_values, build_adamw, param_groups
from trainer.engine.run_log import RunLogger
from trainer.engine.seeding import STREAM_FORWARD
from trainer.engine.seeding import sample_generator as _stream_generator
from trainer.objectives.base import HookContext, Objective, StepContext, TrainingPlan, move_sample
from trainer.schedules import CosineSchedule, cosine_from_epochs

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Loop settings.

    epochs: passes over the training set; the schedules span all of them.
    max_steps: stop after this many optimizer steps (the schedules still span
        `epochs`, so a later `--resume` continues the same curves, and may raise it); None = no limit.
    accum_steps: samples per rank per optimizer step (a multiple of the feed's batch_size).
    clip_grad: max gradient L2 norm (None or 0: no clipping).
    amp: "auto" (bf16 where the GPU supports it, else fp16), "bf16", "fp16" or
        "none"; always fp32 on CPU.
    checkpoint_every: also write `last.pt` every this many optimizer steps (0: only
        at epoch ends and at the end).
    best_metric: validation metric that picks `best.pt` (None: the objective's
        default; SSL objectives have none, so no `best.pt` unless one is named).
    max_skipped_steps: stop after this many fp16-skipped optimizer steps in a row.
    handle_signals: SIGINT/SIGTERM finish the step and write `last.pt` (main thread only).
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
    max_skipped_steps: int = 20
    handle_signals: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("log_every", "validate_every", "max_skipped_steps"):
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


class TrainingStopped(RuntimeError):
    """The run stopped before the optimizer step; `last.pt` keeps the last good state."""


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN/inf; the run stopped before the optimizer step."""


class NonFiniteGradientError(TrainingStopped):
    """The gradient norm became NaN/inf with a finite loss (no GradScaler to skip the step)."""


class SkippedStepsError(TrainingStopped):
    """The fp16 GradScaler skipped too many optimizer steps in a row."""


class RankFailure(TrainingStopped):
    """An exception on one rank; raised on every rank with the failing rank's message."""

    def __init__(self, message: str, *, rank: int, local: bool) -> None:
        super().__init__(message)
        self.rank = rank
        self.local = local


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the step was finished and `last.pt` written; `resume_hint` says how to go on."""

    def __init__(self, message: str, *, signal_name: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.checkpoint = checkpoint


@dataclass(kw_only=True)
class TrainState:
    """Where the run is: optimizer steps done, current epoch, samples of it consumed (this rank)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_value: float | None = None


@dataclass(kw_only=True)
class FitResult:
    """What `fit` returns: per-step train rows, per-epoch val rows, checkpoint paths.

    already_finished: a resumed run had nothing left to do (its stop point was reached).
    messages: lines the run logged (resume notes, objective warnings).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    state: TrainState = field(default_factory=TrainState)
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    best_metric: str | None = None
    already_finished: bool = False
    stop_at: int = 0
    messages: list[str] = field(default_factory=list)


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
    """The forward-stream generator of one sample (`trainer.engine.seeding.sample_generator`)."""
    return _stream_generator(seed, epoch, position, rank, STREAM_FORWARD)


def _describe_error(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _all_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating tensors holding NaN/inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


class Trainer:
    """Drives `objective` over `train` (and validates on `val`) with AdamW and checkpoints.

    checkpoint_meta: plain-data entries every checkpoint carries (config, label_map,
    region_size, mpp, normalization, model_name, model_config, ...).
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
        self.module = self.objective
        self.train_source = train
        self.val_source = val
        self.optim_config = optim_config
        self.config = loop_config
        self.out_dir = Path(out_dir)
        self.device = device
        self.env = env
        self.meta = dict(checkpoint_meta or {})
        clash = sorted(set(self.meta) & {"model", "student", "objective", "optimizer", "rng", "settings"})
        if clash:
            raise ValueError(f"checkpoint_meta may not set the engine's own keys {clash}")
        for source in (train, val):
            if source is not None and hasattr(source, "set_preparer"):
                source.set_preparer(objective.sample_preparer())
        self.batch_size = int(getattr(train, "batch_size", 1))
        if loop_config.accum_steps % self.batch_size:
            raise ValueError(
                f"accum_steps ({loop_config.accum_steps}) counts samples and must be a multiple of "
                f"the micro-batch size data.batch_size ({self.batch_size})"
            )
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
        broadcast_module(self.objective, env)
        self.optimizer = build_adamw(self._param_groups(), optim_config)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ema_pairs = list(objective.ema_pairs())
        if self.ema_pairs:
            check_ema_pairs(self.ema_pairs, {id(p) for p in self.params})
            if MOMENTUM not in self.schedules:
                raise ValueError(f"an objective with EMA teachers must return a schedule named {MOMENTUM!r}")
        self.amp_dtype = resolve_amp(loop_config.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.best_metric = loop_config.best_metric or objective.default_best_metric
        self.best_mode = best_mode_for(self.best_metric, objective)
        self._check_best_metric(explicit=loop_config.best_metric is not None)
        self.state = TrainState()
        self.skipped_in_a_row = 0
        self._logger: RunLogger | None = None
        self._stop = StopRequest(enabled=False)
        self._messages: list[str] = []

    # ----------------------------------------------------------------- set-up
    def _check_best_metric(self, *, explicit: bool) -> None:
        if self.best_metric is None:
            return
        if explicit and (self.val_source is None or not self.objective.has_validation):
            raise ValueError(
                f"best_metric {self.best_metric!r} needs validation, but this run has no validation set "
                "(give a validation split, or leave best_metric unset)"
            )
        names = self.objective.validation_metric_names()
        if names is not None and self.best_metric not in names:
            raise ValueError(
                f"best_metric {self.best_metric!r} is not a validation metric of the {self.objective.name} "
                f"objective; choose one of {', '.join(sorted(names))}"
            )

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

    def settings(self) -> dict[str, Any]:
        """What fixes the data order and the schedules; a resume must keep them (see `load_state`)."""
        return {
            "seed": self.config.seed,
            "accum_steps": self.config.accum_steps,
            "batch_size": self.batch_size,
            "world_size": self.env.world_size,
            "samples_per_epoch": self.samples_per_epoch,
            "epochs": self.config.epochs,
            "objective": self.objective.name,
        }

    # ------------------------------------------------------------- checkpoints
    def state_payload(self) -> dict[str, Any]:
        """Everything a checkpoint holds (plain data and tensors only)."""
        objective = self.objective
        exported = objective.exported_encoder()
        source = objective.export_source
        payload: dict[str, Any] = {
            "format": ckpt.CHECKPOINT_FORMAT,
            "version": ckpt.CHECKPOINT_VERSION,
            **self.meta,
            "model": exported.state_dict(),
            "model_source": source,
            "objective_name": objective.name,
            "objective": objective.objective_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "position": self.state.position,
            "world_size": self.env.world_size,
            "samples_per_epoch": self.samples_per_epoch,
            "rng": ckpt.capture_rng_state(),
            "metrics": {"best_metric": self.best_metric, "best_value": self.state.best_value},
            "settings": self.settings(),
        }
        if source == "teacher":
            payload["student"] = objective.encoder.state_dict()
        elif source != "encoder":
            raise ValueError(f"export_source must be 'encoder' or 'teacher', got {source!r}")
        extras = objective.checkpoint_extras()
        clash = sorted(set(extras) & ckpt.RESERVED_KEYS)
        if clash:
            raise ValueError(f"the {objective.name} objective's checkpoint_extras may not overwrite {clash}")
        payload.update(extras)
        bad = _all_finite(payload["model"]) + _all_finite(payload.get("student") or {})
        bad += _all_finite(payload["objective"])
        if bad:
            raise TrainingStopped(
                f"refusing to save a checkpoint with non-finite weights ({', '.join(bad[:5])}); "
                f"{self.out_dir / ckpt.LAST} keeps the last good state"
            )
        return payload

    def load_state(self, payload: Mapping[str, Any], *, allow_changed_settings: bool = False) -> None:
        """Resume from a checkpoint payload (as read by `checkpoint.load_checkpoint`).

        Settings that fix the data order or the schedules must be unchanged; with
        `allow_changed_settings` the run restarts at the next epoch boundary instead.
        """
        saved = dict(payload.get("settings") or {})
        saved.setdefault("world_size", int(payload.get("world_size", 1)))
        saved.setdefault("samples_per_epoch", int(payload.get("samples_per_epoch", self.samples_per_epoch)))
        saved.setdefault("objective", payload.get("objective_name", self.objective.name))
        now = self.settings()
        changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if "objective" in changed:
            raise ckpt.CheckpointError(
                f"checkpoint was written by the {saved['objective']!r} objective, this run trains "
                f"{now['objective']!r}; start a new run with --init to reuse its encoder"
            )
        shown = ", ".join(f"{k} {a} → {b}" for k, (a, b) in changed.items())
        if changed and not allow_changed_settings:
            raise ckpt.CheckpointError(
                f"resume would change settings that fix the data order or the schedules ({shown}); "
                "keep them, or pass --allow-changed-settings to restart at the next epoch boundary "
                "with the new settings"
            )
        objective = self.objective
        student = payload.get("student") if payload.get("model_source") == "teacher" else payload["model"]
        if student is None:
            raise ckpt.CheckpointError("checkpoint exports a teacher but holds no 'student' weights to resume")
        try:
            objective.encoder.load_state_dict(student)
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
        epoch, position = int(payload["epoch"]), int(payload["position"])
        if changed:
            if position:
                epoch, position = epoch + 1, 0
            self._note(
                f"resume with changed settings ({shown}): restarting at epoch {epoch}, step {int(payload['step'])}, "
                f"with the schedules recomputed for the new settings"
            )
        self.state = TrainState(
            step=int(payload["step"]),
            epoch=epoch,
            position=position,
            best_value=metrics.get("best_value") if same_metric else None,
        )
        ckpt.restore_rng_state(payload["rng"])

    def _note(self, text: str) -> None:
        self._messages.append(text)
        if self._logger is not None:
            self._logger.message(text)

    def _save(self, name: str) -> Path | None:
        path = None
        error: BaseException | None = None
        if self.env.is_main:
            try:
                path = ckpt.atomic_save(self.state_payload(), self.out_dir / name)
            except Exception as exc:  # every rank must hear of it (no rank may wait in the barrier alone)
                error = exc
        self._raise_if_any_failed(error)
        barrier(self.env)
        return path

    def _raise_if_any_failed(self, error: BaseException | None) -> None:
        """Collective: if any rank has an error, every rank raises (the failing rank's own error there)."""
        failures = [(r, m) for r, m in enumerate(all_gather_objects(
            None if error is None else _describe_error(error), self.env)) if m is not None]
        if not failures:
            return
        rank, message = failures[0]
        if error is not None and not self.env.enabled:
            raise error
        text = message if not self.env.enabled else f"rank {rank} of {self.env.world_size}: {message}"
        raise RankFailure(text, rank=rank, local=error is not None) from error

    # -------------------------------------------------------------------- run
    def fit(self, *, resume: Mapping[str, Any] | None = None, allow_changed_settings: bool = False) -> FitResult:
        """Train until `epochs` are done or `max_steps` reached; returns the history and checkpoints."""
        if resume is not None:
            self.load_state(resume, allow_changed_settings=allow_changed_settings)
        cfg = self.config
        stop_at = self.plan.total_steps if cfg.max_steps is None else min(cfg.max_steps, self.plan.total_steps)
        result = FitResult(state=self.state, best_metric=self.best_metric, stop_at=stop_at, messages=self._messages)
        if resume is not None and (self.state.step >= stop_at or self.state.epoch >= cfg.epochs):
            result.already_finished = True
            result.last_checkpoint = self.out_dir / ckpt.LAST if (self.out_dir / ckpt.LAST).exists() else None
            return result
        logger = RunLogger(
            self.out_dir,
            enabled=self.env.is_main,
            total_steps=stop_at,
            start_step=self.state.step,
            tensorboard=cfg.tensorboard,
            progress=cfg.progress,
        )
        self._logger = logger
        for text in self._messages:
            logger.message(text)
        last_saved_step = self.state.step if resume is not None else -1
        try:
            with StopRequest(enabled=cfg.handle_signals) as stop:
                self._stop = stop
                while self.state.step < stop_at and self.state.epoch < cfg.epochs:
                    source = iter(self.train_source.iterate(self.state.epoch, self.state.position))
                    while self.state.position < self.samples_per_epoch and self.state.step < stop_at:
                        row, stop_requested = self._optimizer_step(source)
                        result.history.append(row)
                        if self.state.step % cfg.log_every == 0 or self.state.step == stop_at:
                            logger.log("train", self.state.step, self.state.epoch, row)
                        if stop_requested:
                            self._interrupted(stop_requested)
                        if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                            result.last_checkpoint = self._save(ckpt.LAST)
                            last_saved_step = self.state.step
                    if self.state.position >= self.samples_per_epoch:
                        self._end_epoch(logger, result)
                        last_saved_step = self.state.step
                if last_saved_step != self.state.step:
                    result.last_checkpoint = self._save(ckpt.LAST)
        finally:
            self._stop = StopRequest(enabled=False)
            self._logger = None
            logger.close()
        if result.last_checkpoint is None and (self.out_dir / ckpt.LAST).exists():
            result.last_checkpoint = self.out_dir / ckpt.LAST
        if (self.out_dir / ckpt.BEST).exists():
            result.best_checkpoint = self.out_dir / ckpt.BEST
        result.state = self.state
        return result

    def _interrupted(self, signal_name: str) -> None:
        path = self._save(ckpt.LAST)
        where = self.out_dir / ckpt.LAST
        raise TrainingInterrupted(
            f"{signal_name} received: stopped after optimizer step {self.state.step} (epoch {self.state.epoch}); "
            f"{where} holds the run; resume it with --resume {where}",
            signal_name=signal_name,
            checkpoint=path or where,
        )

    def _end_epoch(self, logger: RunLogger, result: FitResult) -> None:
        finished = self.state.epoch
        self.state.epoch += 1
        self.state.position = 0
        due = (finished + 1) % self.config.validate_every == 0 or finished + 1 == self.config.epochs
        validating = self.val_source is not None and self.objective.has_validation and due
        result.last_checkpoint = self._save(ckpt.LAST)  # the epoch's work is safe before validation starts
        if not validating:
            return
        metrics = self.validate()
        improved = False
        if metrics:
            logger.log("val", self.state.step, finished, metrics)
            result.validations.append({"epoch": finished, "step": self.state.step, **metrics})
            improved = self._is_better(metrics)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            logger.message(f"epoch {finished}: {shown}")
        result.last_checkpoint = self._save(ckpt.LAST)  # again, with the metrics (and the best value) in it
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
        if not math.isfinite(value):
            return False
        best = self.state.best_value
        if best is None or (value > best if self.best_mode == "max" else value < best):
            self.state.best_value = value
            return True
        return False

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _micro_steps(
        self, source: Iterator[Mapping[str, Any]], step: int, group_size: int, values: Mapping[str, float]
    ) -> dict[str, Any]:
        """Run the group's micro-steps; returns this rank's status for the exchange."""
        cfg = self.config
        status: dict[str, Any] = {"loss": 0.0, "samples": 0, "metrics": {}, "bad": [], "error": None}
        done = 0
        try:
            while done < group_size:
                sample = next(source)
                b = batch_size_of(sample)
                raw = sample.get("position", self.state.position)
                positions = [int(p) for p in raw] if isinstance(raw, list) else [int(raw)]
                if positions[0] != self.state.position:
                    raise RuntimeError(
                        f"the feed delivered position {positions[0]} where the loop is at {self.state.position}"
                    )
                generators = tuple(
                    sample_generator(cfg.seed, self.state.epoch, p, self.env.rank) for p in positions
                )
                ctx = StepContext(
                    step=step, epoch=self.state.epoch, position=positions[0], micro_step=done // self.batch_size,
                    accum_steps=group_size, device=self.device, values=values, generator=generators[0],
                    generators=generators, batch_size=b,
                )
                with self._autocast():
                    out = self.module(move_sample(sample, self.device), step_ctx=ctx)
                loss = out["loss"]
                self.scaler.scale(loss.float() * (b / group_size)).backward()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    ids = sample.get("slide_id", f"sample {positions[0]}")
                    status["bad"].extend([str(i) for i in ids] if isinstance(ids, list) else [str(ids)])
                status["loss"] += loss_value * b
                status["samples"] += b
                for key, value in out.items():
                    if key != "loss":
                        total, count = status["metrics"].get(key, (0.0, 0))
                        status["metrics"][key] = (total + float(value) * b, count + b)
                done += b
                self.state.position += b
        except Exception as exc:
            status["error"] = _describe_error(exc)
            status["exception"] = exc
        status["stop"] = self._stop.signal_name
        return status

    def _exchange(self, status: dict[str, Any]) -> tuple[float, int, dict[str, float], list[str], str | None]:
        """All ranks' statuses → (loss sum, samples, per-metric means, bad slides, stop signal); raises on errors."""
        local_exc = status.pop("exception", None)
        statuses = all_gather_objects(status, self.env)
        failures = [(r, s["error"]) for r, s in enumerate(statuses) if s["error"] is not None]
        if failures:
            rank, message = failures[0]
            self.optimizer.zero_grad(set_to_none=True)
            if local_exc is not None and not self.env.enabled:
                raise local_exc
            text = message if not self.env.enabled else f"rank {rank} of {self.env.world_size}: {message}"
            raise RankFailure(text, rank=rank, local=local_exc is not None) from local_exc
        sums: dict[str, tuple[float, int]] = {}
        for s in statuses:
            for key, (total, count) in s["metrics"].items():
                t, c = sums.get(key, (0.0, 0))
                sums[key] = (t + total, c + count)
        means = {k: t / c for k, (t, c) in sorted(sums.items()) if c}
        loss = sum(s["loss"] for s in statuses)
        samples = sum(s["samples"] for s in statuses)
        bad = [slide for s in statuses for slide in s["bad"]]
        stop = next((s["stop"] for s in statuses if s["stop"]), None)
        return loss, samples, means, bad, stop

    def _optimizer_step(self, source: Iterator[Mapping[str, Any]]) -> tuple[dict[str, float], str | None]:
        cfg = self.config
        step = self.state.step
        group_size = min(cfg.accum_steps, self.samples_per_epoch - self.state.position)
        values = {name: schedule(step) for name, schedule in self.schedules.items()}
        apply_schedule_values(self.optimizer, lr=values["lr"], weight_decay=values["weight_decay"])
        self.objective.train()
        started = time.perf_counter()
        status = self._micro_steps(source, step, group_size, values)
        loss_sum, samples, means, bad, stop = self._exchange(status)
        if bad or not math.isfinite(loss_sum):
            self._stop_non_finite(step, bad)
        all_reduce_gradients(self.params, self.env)
        hook_ctx = HookContext(
            step=step, epoch=self.state.epoch, plan=self.plan, values=values,
            rank=self.env.rank, world_size=self.env.world_size,
            all_reduce_sum=lambda t: all_reduce_sum(t, self.env),
        )
        error: BaseException | None = None
        grad_norm = float("nan")
        skipped = False
        try:
            self.scaler.unscale_(self.optimizer)
            self.objective.on_before_optimizer_step(hook_ctx)
            params = [p for p in self.params if p.grad is not None]
            if cfg.clip_grad:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
            elif params:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteGradientError(
                    f"non-finite gradient norm ({grad_norm}) at optimizer step {step} (epoch {self.state.epoch}) "
                    f"with a finite loss; the run stopped before updating the weights. The last good checkpoint "
                    f"is {self.out_dir / ckpt.LAST} (if one was written); resume from it with a lower --lr, "
                    "gradient clipping, or fp32."
                )
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = scale_before is not None and self.scaler.get_scale() < scale_before
            self.optimizer.zero_grad(set_to_none=True)
            if not skipped and self.ema_pairs:
                ema_update(self.ema_pairs, values[MOMENTUM])
            done_ctx = dataclasses.replace(hook_ctx, skipped=skipped)
            self.objective.on_after_step(done_ctx)
        except NonFiniteGradientError:
            raise  # every rank holds the same averaged gradients, so every rank raises here
        except Exception as exc:
            error = exc
        self._raise_if_any_failed(error)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.skipped_in_a_row >= cfg.max_skipped_steps:
            raise SkippedStepsError(
                f"the fp16 GradScaler skipped {self.skipped_in_a_row} optimizer steps in a row (up to step {step}): "
                "the gradients overflow at every scale; use bf16 (--set loop.amp=\"bf16\") or fp32, or a lower lr"
            )
        if self.env.is_main and self._logger is not None:
            for text in self.objective.drain_messages():
                self._note(text)
        else:
            self.objective.drain_messages()
        self.state.step += 1
        elapsed = max(time.perf_counter() - started, 1e-9)
        row = {
            "loss": loss_sum / max(samples, 1),
            **means,
            **values,
            "grad_norm": grad_norm,
            "skipped": float(skipped),
            "samples_per_s": samples / elapsed,
        }
        return row, stop

    def _stop_non_finite(self, step: int, bad_slides: list[str]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = ", ".join(repr(s) for s in bad_slides) or "unknown (the sum over ranks overflowed)"
        raise NonFiniteLossError(
            f"non-finite loss at optimizer step {step} (epoch {self.state.epoch}) on slide(s) {where}; "
            f"the run stopped before updating the weights. The last good checkpoint is "
            f"{self.out_dir / ckpt.LAST} (if one was written); resume from it with a lower --lr or "
            "inspect the slide."
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Run the objective's validation over every rank's shard; metrics on all ranks."""
        objective = self.objective
        if self.val_source is None or not objective.has_validation:
            return {}
        was_training = objective.training
        objective.eval()
        records: list[dict[str, Any]] = []
        devices = []
        if self.device.type == "cuda":  # "cuda" without an index (torchrun) is this rank's current device
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        error: BaseException | None = None
        with torch.random.fork_rng(devices=devices):
            try:
                for sample in self.val_source.iterate(0, 0):
                    with self._autocast():
                        record = objective.validation_step(move_sample(sample, self.device), device=self.device)
                    records.append(record)
            except Exception as exc:
                error = exc
        objective.train(was_training)
        self._raise_if_any_failed(error)
        gathered = [r for part in all_gather_objects(records, self.env) for r in part]
        unique: dict[Any, dict[str, Any]] = {}
        for i, record in enumerate(gathered):
            unique.setdefault(record.get("index", i), record)
        return objective.validation_metrics(list(unique.values()))
