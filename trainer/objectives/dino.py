"""DINO at whole-slide scale (thesis §3.3, §4.3; Caron et al. 2021; REFERENCE_NOTES "DINO").

Per slide: the loader's `MultiCropPreparer` draws 2 global + N local views
(region index sets + augmentation parameters, `trainer.data.views`); `forward`
augments each view's regions on the device (`trainer.data.view_augment`), runs

    student = head(mean CLS of encoder(view))          for every view      (V, out_dim)
    teacher = teacher_head(mean CLS of teacher(view))  for the global views (G, out_dim), no grad

and the loss is DINO's cross-entropy between the centred, sharpened teacher
distribution and the student's, averaged over the (teacher view t, student view
s ≠ t) pairs, as DINO's code does:

    q_t = softmax((teacher_t − centre) / T_teacher),  log p_s = log_softmax(student_s / T_student)
    loss = mean over pairs of −Σ q_t · log p_s

The teacher (encoder + head) is a frozen deep copy of the student; the engine
EMA-updates it after every optimizer step with the "ema_momentum" schedule
(cosine 0.996 → 1). The centre is updated once per optimizer step, in
`on_after_step`, from the mean teacher output over that step's micro-steps and
all ranks (`ctx.all_reduce_sum`): centre = m·centre + (1 − m)·mean, m 0.9;
not on a skipped (fp16 overflow) step. "teacher_temp" warms up linearly
0.04 → 0.07 over 30 epochs, then stays. In epoch 0 the head's last layer gets
no update (its gradients are dropped in `on_before_optimizer_step`), where
DINO's per-parameter gradient clipping (`clip_grad_per_param`) also runs.

Views run through the encoder one call each, or packed into one call
(`encoder(regions, segments=view_ids, generator=[...])`, one output per view)
when `pack_views` and the encoder supports `segments`; each view has its own
generator (split from the step's), so both paths draw the same fusion splits
and drop paths.

Slide embedding (monitors, validation, export) = the teacher encoder's
mean-pooled CLS tokens (the encoder's `embedding`). The checkpoint exports the
teacher encoder (`export_source = "teacher"`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from trainer.data.view_augment import augment_view
from trainer.data.views import MultiCropPreparer, View, ViewConfig, make_views
from trainer.schedules import CosineSchedule
from trainer.eval.metrics import mean_pairwise_cosine, rankme
from trainer.eval.probe import PROBE_VALIDATION_METRICS, probe_validation_metrics
from trainer.objectives.base import HookContext, Objective, StepContext, TrainingPlan, make_teacher


@dataclass(frozen=True, kw_only=True)
class DinoConfig:
    """DINO settings (recipe section `[dino]`; `[dino.views]` is a `ViewConfig`).

    out_dim, hidden_dim, bottleneck_dim, head_layers: the projection head.
    student_temp; teacher_temp → teacher_temp_final over teacher_temp_epochs (linear warm-up).
    center_momentum: the centre's EMA momentum.
    ema_momentum → ema_momentum_final: the teacher's EMA momentum (cosine over the run).
    freeze_last_layer_epochs: the head's last layer gets no update for these first epochs.
    clip_grad_per_param: clip every parameter's gradient norm to this (DINO's clipping;
        0 = off; the engine's global clip is `loop.clip_grad`).
    pack_views: run all views in one packed encoder call where the model supports `segments`.
    monitor_window: slides per RankMe / mean-cosine window of training slide embeddings.
    collapse_cosine, collapse_rankme: warn when a window's mean cosine is above / RankMe below these.
    val_seed: seed of the validation views (per slide: val_seed + index).
    probe_validation: also cross-validate a linear probe and kNN on the labelled validation
      slides' teacher embeddings (`trainer.eval.probe`; metrics linear_*/knn_*, skipped when unlabelled).
    eval_regions: validate on at most this many regions per slide (evenly spaced in grid
        order, the same every time; 0 = all) — a CPU-demo cap like supervised's.
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_final: float = 0.07
    teacher_temp_epochs: float = 30.0
    center_momentum: float = 0.9
    ema_momentum: float = 0.996
    ema_momentum_final: float = 1.0
    freeze_last_layer_epochs: int = 1
    clip_grad_per_param: float = 0.0
    pack_views: bool = True
    monitor_window: int = 64
    collapse_cosine: float = 0.95
    collapse_rankme: float = 1.5
    val_seed: int = 12345
    probe_validation: bool = True
    eval_regions: int = 0
    views: ViewConfig = field(default_factory=ViewConfig)

    def __post_init__(self) -> None:
        if isinstance(self.views, Mapping):
            known = {f.name for f in fields(ViewConfig)}
            unknown = sorted(set(self.views) - known)
            if unknown:
                raise ValueError(f"unknown [dino.views] key(s) {unknown}; valid: {sorted(known)}")
            object.__setattr__(self, "views", ViewConfig(**self.views))
        if self.eval_regions < 0:
            raise ValueError(f"eval_regions must be >= 0 (0 = all), got {self.eval_regions}")
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "monitor_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {self.head_layers}")
        for name in ("student_temp", "teacher_temp", "teacher_temp_final"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.teacher_temp_epochs < 0 or self.freeze_last_layer_epochs < 0 or self.clip_grad_per_param < 0:
            raise ValueError("teacher_temp_epochs, freeze_last_layer_epochs and clip_grad_per_param must be >= 0")
        for name in ("center_momentum", "ema_momentum", "ema_momentum_final"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class DinoHead(nn.Module):
    """DINO's projection head: MLP d → hidden (GELU) … → bottleneck, L2-normalise, then a
    weight-normalised Linear(bottleneck → out_dim, no bias) whose norm is fixed at 1.

    x: (B, d) → (B, out_dim).
    """

    def __init__(self, in_dim: int, *, out_dim: int, hidden_dim: int, bottleneck_dim: int, layers: int) -> None:
        super().__init__()
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            parts: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(layers - 2):
                parts += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            parts.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*parts)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def dino_loss(
    student: Tensor, teacher: Tensor, centre: Tensor, *, student_temp: float, teacher_temp: float
) -> Tensor:
    """DINO's cross-entropy. student (V, K) logits of all views, teacher (G, K) logits of the
    first G (global) views, centre (K,). Mean over pairs (t, s), t < G, s ≠ t."""
    log_p = F.log_softmax(student.float() / student_temp, dim=-1)
    q = F.softmax((teacher.float() - centre) / teacher_temp, dim=-1)
    total = student.new_zeros((), dtype=torch.float32)
    pairs = 0
    for t in range(q.shape[0]):
        for s in range(log_p.shape[0]):
            if s == t:
                continue
            total = total - (q[t] * log_p[s]).sum()
            pairs += 1
    return total / pairs


def supports_segments(encoder: nn.Module) -> bool:
    """True when `encoder.forward` takes `segments` (packed views, one output per view)."""
    return "segments" in inspect.signature(encoder.forward).parameters


def view_generators(generator: torch.Generator | None, count: int) -> list[torch.Generator | None]:
    """One generator per view, seeded from `generator` (None stays None: global RNG)."""
    if generator is None:
        return [None] * count
    seeds = torch.randint(0, 2**62, (count,), generator=generator).tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class DinoObjective(Objective):
    """DINO with an EMA teacher (encoder + head) over multi-crop slide views.

    encoder: a PixelMamba without a classification head (num_classes = 0).
    """

    name = "dino"
    requires_labels = False
    export_source = "teacher"
    has_validation = True
    default_best_metric = None  # SSL: best.pt only for a metric the user names (--best-metric)
    best_mode = "max"

    def __init__(self, encoder: nn.Module, *, config: DinoConfig) -> None:
        super().__init__()
        if getattr(getattr(encoder, "config", None), "num_classes", 0):
            raise ValueError("DINO trains an encoder without a classification head: build the model with num_classes=0")
        self.config = config
        self.encoder = encoder
        self.head = DinoHead(
            int(encoder.embed_dim), out_dim=config.out_dim, hidden_dim=config.hidden_dim,
            bottleneck_dim=config.bottleneck_dim, layers=config.head_layers,
        )  # fmt: skip
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_head = make_teacher(self.head)
        self.register_buffer("centre", torch.zeros(config.out_dim))
        self.pack = bool(config.pack_views and supports_segments(encoder))
        self._centre_sum: Tensor | None = None
        self._centre_count = 0
        self._window: list[Tensor] = []
        self._window_metrics: dict[str, float] = {}
        self._messages: list[str] = []

    # ---------------------------------------------------------------- contract
    def sample_preparer(self) -> MultiCropPreparer:
        return MultiCropPreparer(config=self.config.views)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher_encoder, self.encoder), (self.teacher_head, self.head)]

    def exported_encoder(self) -> nn.Module:
        return self.teacher_encoder

    def schedules(self, plan: TrainingPlan) -> dict[str, CosineSchedule]:
        cfg = self.config
        warmup = min(plan.total_steps, round(cfg.teacher_temp_epochs * plan.steps_per_epoch))
        return {
            "ema_momentum": CosineSchedule(
                base=cfg.ema_momentum, final=cfg.ema_momentum_final, total_steps=plan.total_steps
            ),
            "teacher_temp": CosineSchedule(
                base=cfg.teacher_temp_final, final=cfg.teacher_temp_final, total_steps=plan.total_steps,
                warmup_steps=warmup, warmup_start=cfg.teacher_temp,
            ),
        }  # fmt: skip

    def drain_messages(self) -> list[str]:
        messages, self._messages = self._messages, []
        return messages

    # ------------------------------------------------------------------ passes
    def _embed(
        self, encoder: nn.Module, inputs: Sequence[Tensor], generators: Sequence[torch.Generator | None]
    ) -> Tensor:
        """Mean-pooled CLS of every view: inputs [(k_v, R, R, 3) float], → (V, C)."""
        if self.pack and len(inputs) > 1:
            segments = torch.cat(
                [torch.full((len(x),), v, dtype=torch.long, device=x.device) for v, x in enumerate(inputs)]
            )
            per_view = None if all(g is None for g in generators) else list(generators)
            outputs = encoder(torch.cat(list(inputs)), segments=segments, generator=per_view)
        else:
            outputs = [encoder(x, generator=g) for x, g in zip(inputs, generators)]
        return torch.stack([out.embedding for out in outputs])

    def _views(self, sample: Mapping[str, Any]) -> list[View]:
        views = sample.get("views")
        if views is None:
            raise KeyError(
                "the sample has no 'views': DINO needs its sample_preparer() run on every sample "
                "(the engine's feed does this in the loader)"
            )
        global_views = self.config.views.global_views
        if len(views) < 2 or [v.kind for v in views[:global_views]] != ["global"] * global_views:
            kinds = [v.kind for v in views]
            raise ValueError(f"expected {global_views} global views first and >= 2 views, got {kinds}")
        return list(views)

    def _losses(
        self, sample: Mapping[str, Any], views: list[View], generator: torch.Generator | None, teacher_temp: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, teacher logits (G, K), teacher slide embedding (C,)) for one slide's views."""
        regions = sample["regions"]
        inputs = [augment_view(regions, view) for view in views]
        global_count = self.config.views.global_views
        student = self.head(self._embed(self.encoder, inputs, view_generators(generator, len(inputs))))
        with torch.no_grad():
            teacher_embedding = self._embed(self.teacher_encoder, inputs[:global_count], [None] * global_count)
            teacher = self.teacher_head(teacher_embedding)
        loss = dino_loss(
            student, teacher, self.centre, student_temp=self.config.student_temp, teacher_temp=teacher_temp
        )
        return loss, teacher.detach().float(), teacher_embedding.mean(dim=0).detach().float()

    def forward(self, sample: Mapping[str, Any], *, step_ctx: StepContext) -> dict[str, Tensor]:
        """sample: regions (n, R, R, 3) uint8 on the device, views from the preparer."""
        if "teacher_temp" not in step_ctx.values:
            raise KeyError("step_ctx.values lacks 'teacher_temp': the engine passes the objective's schedules")
        views = self._views(sample)
        teacher_temp = float(step_ctx.values["teacher_temp"])
        loss, teacher, embedding = self._losses(sample, views, step_ctx.generator, teacher_temp)
        batch_sum = teacher.sum(dim=0)
        self._centre_sum = batch_sum if self._centre_sum is None else self._centre_sum + batch_sum
        self._centre_count += teacher.shape[0]
        self._window.append(embedding.cpu())
        q = F.softmax((teacher - self.centre) / teacher_temp, dim=-1)
        entropy = -(q * q.clamp_min(1e-12).log()).sum(dim=-1).mean()
        out = {
            "loss": loss,
            "teacher_entropy": entropy,
            "view_regions": torch.tensor(float(np.mean([len(v) for v in views]))),
            "fallback_views": torch.tensor(float(sum(v.path == "fallback" for v in views))),
        }
        out.update({k: torch.tensor(v) for k, v in self._window_metrics.items()})
        return out

    # ------------------------------------------------------------------- hooks
    def on_before_optimizer_step(self, ctx: HookContext) -> None:
        limit = self.config.clip_grad_per_param
        if limit > 0:
            for p in self.parameters():
                if p.grad is not None:
                    norm = p.grad.detach().norm()
                    p.grad.mul_(torch.clamp(limit / (norm + 1e-6), max=1.0))
        if ctx.epoch < self.config.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_after_step(self, ctx: HookContext) -> None:
        if self._centre_sum is not None and not ctx.skipped:
            packed = torch.cat([self._centre_sum, self._centre_sum.new_tensor([float(self._centre_count)])])
            total = ctx.all_reduce_sum(packed)
            mean = total[:-1] / total[-1]
            m = self.config.center_momentum
            self.centre.mul_(m).add_(mean.to(self.centre.dtype), alpha=1.0 - m)
        self._centre_sum = None
        self._centre_count = 0
        if len(self._window) >= self.config.monitor_window:
            self._close_window(ctx.step)

    # ---------------------------------------------------------------- state
    def objective_state_dict(self) -> dict[str, Tensor]:
        """Head, teachers and centre, plus the monitor: the open window of slide embeddings
        (k, embed_dim) and the last closed window's [RankMe, mean cosine] (empty before the first),
        so a resumed run closes its windows where the uninterrupted run would (rank 0's window)."""
        state = super().objective_state_dict()
        dim = int(self.encoder.embed_dim)
        state["monitor.window"] = torch.stack(self._window) if self._window else torch.zeros(0, dim)
        metrics = self._window_metrics
        state["monitor.metrics"] = torch.tensor([metrics["rankme"], metrics["mean_cosine"]] if metrics else [], dtype=torch.float64)
        return state

    def load_objective_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore `objective_state_dict`; checkpoints from before the monitor was saved load with an empty one."""
        state = dict(state)
        window, metrics = state.pop("monitor.window", None), state.pop("monitor.metrics", None)
        super().load_objective_state_dict(state)
        self._window = [row.cpu() for row in window] if window is not None else []
        values = metrics.tolist() if metrics is not None else []
        self._window_metrics = dict(zip(("rankme", "mean_cosine"), values)) if values else {}

    def _close_window(self, step: int) -> None:
        window = torch.stack(self._window)
        self._window = []
        metrics = {"rankme": rankme(window), "mean_cosine": mean_pairwise_cosine(window)}
        self._window_metrics = metrics
        line = (
            f"dino monitor (step {step}, {len(window)} slides): RankMe {metrics['rankme']:.3f}, "
            f"mean pairwise cosine {metrics['mean_cosine']:.3f}"
        )
        self._messages.append(line)
        if metrics["mean_cosine"] > self.config.collapse_cosine or metrics["rankme"] < self.config.collapse_rankme:
            self._messages.append(
                f"WARNING: possible collapse at step {step}: teacher slide embeddings have mean cosine "
                f"{metrics['mean_cosine']:.3f} (warn above {self.config.collapse_cosine}) and RankMe "
                f"{metrics['rankme']:.3f} (warn below {self.config.collapse_rankme})"
            )

    # -------------------------------------------------------------- validation
    def validation_step(self, sample: Mapping[str, Any], *, device: torch.device) -> dict[str, Any]:
        """DINO loss on views drawn with a fixed generator (val_seed + index), at the final teacher
        temperature, and the teacher's embedding of the whole slide."""
        index = int(sample.get("index", 0))
        limit = self.config.eval_regions
        if limit and sample["regions"].shape[0] > limit:
            keep = torch.linspace(0, sample["regions"].shape[0] - 1, limit).round().long().unique()
            sample = {**sample, "regions": sample["regions"][keep.to(sample["regions"].device)],
                      "coords": sample["coords"][keep.to(sample["coords"].device)]}  # fmt: skip
        views = make_views(
            sample["coords"].cpu(), config=self.config.views,
            generator=torch.Generator().manual_seed(self.config.val_seed + index),
        )  # fmt: skip
        loss, _, _ = self._losses(sample, views, None, self.config.teacher_temp_final)
        embedding = self.teacher_encoder(sample["regions"]).embedding.float().cpu()
        return {
            "index": index,
            "slide_id": str(sample.get("slide_id", "")),
            "loss": float(loss),
            "embedding": embedding.tolist(),
            "label": int(sample.get("label", -1)),
        }

    def validation_metric_names(self) -> set[str]:
        names = {"loss", "rankme", "mean_cosine"}
        if self.config.probe_validation:
            names |= PROBE_VALIDATION_METRICS
        return names

    def validation_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        embeddings = torch.tensor([r["embedding"] for r in records], dtype=torch.float64)
        metrics = {"loss": float(np.mean([r["loss"] for r in records])), "rankme": rankme(embeddings)}
        if len(records) > 1:
            metrics["mean_cosine"] = mean_pairwise_cosine(embeddings)
        if self.config.probe_validation:
            metrics.update(probe_validation_metrics(records))
        return metrics

