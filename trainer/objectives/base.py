"""The objective interface: what the engine needs from supervised, LatentMIM and DINO alike.

An objective is an `nn.Module` that owns the encoder being trained (`self.encoder`,
a PixelMamba) and everything else the loss needs: heads, predictors, EMA teachers,
centres. The engine (trainer.engine.loop) drives every objective the same way:

    in the DataLoader workers, per sample (trainer.engine.feed):
        g = generator(seed, epoch, position, rank, STREAM_PREPARE)
        sample = region cap (--precrop-regions, drawn from g)
        sample = objective.sample_preparer()(sample, g)
    per micro-step:
        ctx = StepContext(step=s, epoch=e, position=p, micro_step=j, accum_steps=k,
                          values={"lr": ..., "weight_decay": ..., **objective schedules at s},
                          generator=<generator(seed, epoch, position, rank, STREAM_FORWARD)>)
        with autocast:
            out = objective(sample, step_ctx=ctx)   # {"loss": scalar tensor, **scalar metrics}
        backward(out["loss"] * samples / group_size)
    after the group's last micro-step (all ranks exchange status, then average gradients):
        objective.on_before_optimizer_step(hook_ctx)   # grads unscaled; e.g. freeze DINO's last layer in epoch 0
        clip, optimizer.step()                         # hook_ctx.skipped: fp16 overflow skipped it
        EMA (unless skipped): teacher = m·teacher + (1−m)·student over objective.ema_pairs(),
                              m = values["ema_momentum"]
        objective.on_after_step(hook_ctx)              # e.g. DINO's centre update (hook_ctx.all_reduce_sum)
        log objective.drain_messages()
    at each epoch's end (eval mode, no grad, every rank on its shard; samples prepared too):
        records = [objective.validation_step(sample, device=d) for sample in val_shard]
        metrics = objective.validation_metrics(all ranks' records)

One forward call handles one sample (one slide) and may run the encoder several
times (DINO: 2 global + n local views; LatentMIM: context and target passes).
Per-iteration schedules that belong to the objective (EMA momentum, teacher
temperature) come from `schedules(plan)`; the engine evaluates them every step
and passes the values in `step_ctx.values` and `HookContext.values`. Everything in the
objective's `state_dict` (teacher weights, DINO's centre buffer) is checkpointed.

SSL extension (the contract the engine and every objective share):

- `sample_preparer()` returns a light, picklable callable `prepare(sample, generator)
  -> sample` (or None). The engine's feed runs it inside DataLoader workers, after
  the data layer's region cap (`--precrop-regions`), with a CPU generator seeded
  from SeedSequence([seed, epoch, position, rank, STREAM_PREPARE]); `forward`'s
  `step_ctx.generator` comes from the same tuple with STREAM_FORWARD, so mask or
  crop draws are never replayed as drop-path or fusion draws. Index work only
  (masks, crops, flips, augmentation parameters); pixels stay uint8.
- `ema_pairs()` lists (teacher, student) module pairs. After every optimizer step
  that was not skipped, the engine sets teacher = m·teacher + (1−m)·student over
  matching parameters and buffers, m = `values["ema_momentum"]` (the objective's
  schedule of that name). Teachers are frozen (`make_teacher`), never in the
  optimizer, and stay in eval mode whatever `train()` is called with.
- Hooks get a `HookContext` (step, epoch, plan, schedule values, whether the
  optimizer step was skipped, rank/world size and an all-reduce helper for
  objective-owned statistics such as DINO's centre).
- `export_source` says which encoder is the checkpoint's "model": "encoder" (the
  trained one; supervised) or "teacher" (`exported_encoder()`, the EMA teacher
  for LatentMIM and DINO). The student is still saved for resume.
- `requires_labels = False` for SSL objectives: they train on every slide of the
  training split, labelled or not.
- `validation_metric_names()` lists the metrics `validation_metrics` can return
  (None: not known in advance), so a mistyped `best_metric` is refused at start-up.
- `regions_per_step(n_regions)`: how many regions the encoder processes (forward
  and backward, all passes together) for a slide of `n_regions` after the region
  cap; the engine's memory estimate multiplies it by the measured per-region peak.
  E.g. LatentMIM: visible regions with gradients + target regions without;
  DINO: the regions of all views. The default is `n_regions` (one pass).
- Micro-batches: with `data.batch_size` B > 1 the sample holds B samples packed
  (`segments`, see `trainer.data.collate`) and `forward` returns the mean loss
  over them; `step_ctx.generators` has one generator per sample.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from trainer.schedules import CosineSchedule


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """What an objective needs to build its schedules: lengths in optimizer steps."""

    total_steps: int
    steps_per_epoch: int
    epochs: int


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """Per micro-step information handed to `Objective.forward`.

    step: the optimizer step this micro-step contributes to (0-based).
    position: index of this sample within the rank's epoch shard.
    values: schedule values at `step` ("lr", "weight_decay", plus the objective's own).
    generator: CPU generator for the sample's forward randomness (fusion splits,
        drop path); seeded from (seed, epoch, position, rank, STREAM_FORWARD) so a
        resumed run redraws exactly the same numbers. For a micro-batch, the first
        sample's generator.
    generators: one such generator per sample of a micro-batch (`batch_size` > 1,
        see `trainer.data.collate`); `(generator,)` for a single sample.
    batch_size: samples in this micro-step's (collated) sample.
    """

    step: int
    epoch: int
    position: int
    micro_step: int
    accum_steps: int
    device: torch.device
    values: Mapping[str, float] = field(default_factory=dict)
    generator: torch.Generator | None = None
    generators: tuple[torch.Generator, ...] = ()
    batch_size: int = 1


STREAM_FORWARD = 0
STREAM_PREPARE = 1


@dataclass(frozen=True, kw_only=True)
class HookContext:
    """What `on_before_optimizer_step` / `on_after_step` receive.

    skipped: the optimizer step was skipped (fp16 GradScaler overflow): EMA and
        centre updates must not happen (the engine already skips its EMA update).
    all_reduce_sum: sums a tensor over all ranks and returns the sum (the input
        itself on one process); for objective-owned statistics such as DINO's centre.
    """

    step: int
    epoch: int
    plan: TrainingPlan
    values: Mapping[str, float] = field(default_factory=dict)
    skipped: bool = False
    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


class SamplePreparer(Protocol):
    """Loader-side preparation: `prepare(sample, generator) -> sample` (index work only, picklable)."""

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]: ...


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student` for EMA: no gradients, eval mode (drop path off)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


class Objective(nn.Module):
    """Base class of training objectives; subclasses implement `forward` (and, for
    validation, `has_validation = True`, `validation_step` and `validation_metrics`).

    Attributes subclasses set: `encoder` (the trained model; the checkpoint's "model"
    is `exported_encoder()`), `name` (registry name), `default_best_metric`,
    `best_mode` ("max"/"min"). `find_unused_parameters` is kept for compatibility;
    the engine's explicit gradient averaging handles parameters a step leaves unused.
    """

    name: ClassVar[str] = "objective"
    requires_labels: ClassVar[bool] = True
    export_source: ClassVar[str] = "encoder"
    default_best_metric: str | None = None
    best_mode: str = "max"
    find_unused_parameters: ClassVar[bool] = False

    encoder: nn.Module

    def forward(self, sample: Mapping[str, Any], *, step_ctx: StepContext) -> dict[str, torch.Tensor]:
        """One sample → {"loss": scalar tensor with grad, **scalar metric tensors/floats}."""
        raise NotImplementedError

    def schedules(self, plan: TrainingPlan) -> dict[str, CosineSchedule]:
        """Extra per-iteration schedules (e.g. {"ema_momentum": ..., "teacher_temp": ...})."""
        return {}

    def no_weight_decay_names(self) -> Iterable[str]:
        """Parameter names (as in `self.named_parameters()`) that must not decay, beyond the defaults."""
        return ()

    def param_group_hints(self) -> dict[str, dict[str, float]]:
        """Per-parameter-name overrides of a group's settings, e.g. {"head.weight": {"lr_scale": 10.0}}.

        The engine puts each hinted parameter into its own AdamW group.
        """
        return {}

    def sample_preparer(self) -> SamplePreparer | None:
        """The loader-side `prepare(sample, generator)` step (masks, crops, flips), or None."""
        return None

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) pairs the engine EMA-updates after each non-skipped optimizer step."""
        return []

    def exported_encoder(self) -> nn.Module:
        """The encoder a checkpoint exports as its "model" (`export_source` names which)."""
        return self.encoder

    def train(self, mode: bool = True) -> Objective:
        super().train(mode)
        for teacher, _ in self.ema_pairs():
            teacher.eval()
        return self

    def drain_messages(self) -> list[str]:
        """Warnings for the run log (e.g. a collapse monitor firing); the engine calls this after
        every optimizer step on the main process, logs each line, and the objective forgets them."""
        return []

    def on_before_optimizer_step(self, ctx: HookContext) -> None:
        """Called with unscaled gradients before clipping and `optimizer.step()`."""

    def on_after_step(self, ctx: HookContext) -> None:
        """Called after `optimizer.step()` (or its skip: `ctx.skipped`) of optimizer step `ctx.step`."""

    has_validation: ClassVar[bool] = False

    def validation_step(self, sample: Mapping[str, Any], *, device: torch.device) -> dict[str, Any]:
        """One validation sample → a plain, picklable record (e.g. label and class probabilities).

        The engine calls it in eval mode under `torch.no_grad()` and autocast, on every
        rank's shard of the validation set, gathers all records (de-duplicated by
        "index") and hands them to `validation_metrics` on every rank.
        """
        raise NotImplementedError

    def validation_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics over all validation records (e.g. qwk, balanced accuracy)."""
        return {}

    def validation_metric_names(self) -> set[str] | None:
        """Names `validation_metrics` may return (None: unknown, `best_metric` is then checked after
        the first validation)."""
        return None

    def regions_per_step(self, n_regions: int) -> float:
        """Regions the encoder processes for one slide of `n_regions` (for the memory estimate)."""
        return float(n_regions)

    def checkpoint_extras(self) -> dict[str, Any]:
        """Plain-data entries for the checkpoint (e.g. {"label_map": ...})."""
        return {}

    def objective_state_dict(self) -> dict[str, torch.Tensor]:
        """The state to checkpoint beside the encoder: everything not under `encoder.`."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_objective_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what `objective_state_dict` saved (strict)."""
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise KeyError(f"objective state does not fit: missing {missing}, unexpected {list(unexpected)}")


def encode_packed(
    encoder: nn.Module, regions: torch.Tensor, segments: torch.Tensor, generators: list[torch.Generator]
) -> list[Any]:
    """Encode a micro-batch: one `PixelMambaOutput` per view/sample (segment id 0..B−1, in order).

    regions: (N, R, R, 3) uint8; segments: (N,) long, non-decreasing view index per region;
    generators: one per view. Uses the model's packed forward (`encoder(regions,
    segments=..., generator=[...])`) where the model has one, else one call per view
    (the packed forward is specified to equal exactly that).
    """
    counts = torch.bincount(segments.cpu(), minlength=len(generators)).tolist()
    if len(counts) != len(generators):
        raise ValueError(f"{len(counts)} segments but {len(generators)} generators")
    if "segments" in inspect.signature(encoder.forward).parameters:
        return list(encoder(regions, segments=segments, generator=list(generators)))
    outputs, start = [], 0
    for count, generator in zip(counts, generators):
        outputs.append(encoder(regions[start : start + count], generator=generator))
        start += count
    return outputs


def move_sample(sample: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The sample with its tensors on `device` (non-blocking), also inside nested dicts, lists and
    tuples (e.g. a preparer's per-view index tensors); other entries unchanged."""
    return {k: _move(v, device) for k, v in sample.items()}


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    return value
