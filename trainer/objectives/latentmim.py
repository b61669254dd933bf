"""LatentMIM for whole slides (thesis §3.2, §4.2; DESIGN.md §9; REFERENCE_NOTES "LatentMIM").

One slide per call:

    loader (RegionMasking.__call__, in DataLoader workers, its own seed stream):
        foreground regions → "visible" / "target" index sets (mask ratio 0.75, ≥ 1 each)
    forward:
        student = encoder(regions[visible])               train mode: random fusion split, drop path
        teacher = EMA(encoder)(regions[target])           eval mode: alternating split, no drop path, no grad
        positions: trainer.models.positions.token_positions(coords, region_ids, grid)
        predictions = predictor(student tokens + pos, queries at the teacher's token positions)
        loss = patch discrimination (InfoNCE within the slide over target tokens, τ = 0.2) × 2τ

Masking is done by the preparer, which only adds index tensors: `forward` indexes
`regions` / `coords` itself (`sample["visible"]`, `sample["target"]`: (n_v,), (n_t,)
long, sorted, disjoint, covering all n regions). A slide needs `min_regions = 2`
regions; the data layer filters smaller ones out before training.

Targets are the teacher's output tokens after fusion: one query per teacher spatial
token (zero-initialised mask token + position) and one learnable CLS query per
surviving teacher region at its representative region's centre. Which tokens enter
the loss is `cls_loss`: "exclude" (the default, as LatentMIM excludes its global
CLS), "include" (spatial and CLS tokens in one set), or "only" (CLS queries and
keys only: thesis §4.2's "CLS only" variant).

The loss (sign per DESIGN.md §9): predictions are standardised per slide over the
loss tokens ((x − mean) / (population std + 1e-4), per channel), predictions and
targets L2-normalised, logits[k, l] = cos(ẑ_k, z_l) / τ, cross-entropy against the
diagonal, × 2τ. Computed in fp32 outside autocast; memory is (T × T) for T loss tokens.

Beyond the thesis (off by default; its discussion's remedies for the predictor
collapse it found): a deeper predictor (`predictor.depth`), a down-weighted
positional embedding on the predictor's visible input (`predictor.visible_pos_weight`),
and `pos_penalty` · mean(relu(cos(h_k, pos_k) − margin)), a penalty on predictor
outputs h (its final hidden state, where positions were added) that resemble their
own query's positional embedding.

Monitors (returned as step metrics, so the engine logs them): mean pairwise cosine
similarity of the visible, target and predicted tokens (spatial tokens; CLS tokens
in "only" mode; left out on a step where fewer than two such tokens exist). The
predicted similarity, averaged per optimizer step over ranks, feeds a collapse
monitor: when it stays above `collapse_threshold` for `collapse_window` consecutive
optimizer steps a warning goes out through `drain_messages()` (once, re-armed when it
drops below).

Validation (per slide, eval mode): the objective's loss under a fixed mask (seeded by
`val_seed` and the sample index, so epochs are comparable), and the teacher on all
regions: its slide embedding (mean CLS) and within-slide token / region similarity and
RankMe; over slides: RankMe and mean pairwise cosine of the slide embeddings.

The checkpoint's "model" is the EMA teacher (`export_source = "teacher"`), as DINO's
authors evaluate; the thesis does not say which it used.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.schedules import CosineSchedule
from trainer.eval.metrics import mean_pairwise_cosine, rankme
from trainer.eval.probe import PROBE_VALIDATION_METRICS, probe_validation_metrics
from trainer.models.positions import token_positions
from trainer.objectives.base import HookContext, Objective, StepContext, TrainingPlan, make_teacher
from trainer.objectives.latentmim_predictor import LatentMIMPredictor, PredictorConfig

CLS_LOSS_CHOICES = ("exclude", "include", "only")
STANDARDIZE_EPS = 1e-4


@dataclass(frozen=True, kw_only=True)
class LatentMIMConfig:
    """LatentMIM settings (recipe table `[latentmim]`, predictor in `[latentmim.predictor]`).

    mask_ratio: fraction of a slide's regions that become targets (rounded, ≥ 1 target
      and ≥ 1 visible region).
    tau: InfoNCE temperature. cls_loss: "exclude" | "include" | "only" (see module doc).
    region_fusion: Region Fusion on/off for student and teacher; None = the model's setting.
    ema_momentum → ema_momentum_end: the teacher's EMA momentum (cosine over training).
    pos_penalty, pos_penalty_margin: weight (0 = off) and margin of the positional penalty.
    collapse_threshold, collapse_window: warn when the predicted tokens' mean pairwise
      cosine stays above the threshold for this many optimizer steps (window 0 = off).
    eval_regions: at most this many evenly spaced regions per validation slide (0 = all).
    val_seed: seed of the fixed validation masks.
    probe_validation: also cross-validate a linear probe and kNN on the labelled validation
      slides' teacher embeddings (`trainer.eval.probe`; metrics linear_*/knn_*, skipped when unlabelled).
    """

    mask_ratio: float = 0.75
    tau: float = 0.2
    cls_loss: str = "exclude"
    region_fusion: bool | None = None
    ema_momentum: float = 0.99
    ema_momentum_end: float = 1.0
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    pos_penalty: float = 0.0
    pos_penalty_margin: float = 0.0
    collapse_threshold: float = 0.98
    collapse_window: int = 50
    eval_regions: int = 0
    val_seed: int = 0
    probe_validation: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.cls_loss not in CLS_LOSS_CHOICES:
            raise ValueError(f"cls_loss must be one of {', '.join(CLS_LOSS_CHOICES)}, got {self.cls_loss!r}")
        if not 0.0 <= self.ema_momentum <= self.ema_momentum_end <= 1.0:
            raise ValueError(
                f"need 0 <= ema_momentum <= ema_momentum_end <= 1, got {self.ema_momentum} → {self.ema_momentum_end}"
            )
        if self.pos_penalty < 0:
            raise ValueError(f"pos_penalty must be >= 0, got {self.pos_penalty}")
        if self.collapse_window < 0 or self.eval_regions < 0:
            raise ValueError(
                f"collapse_window and eval_regions must be >= 0, got {self.collapse_window}, {self.eval_regions}"
            )
        if isinstance(self.predictor, Mapping):
            object.__setattr__(self, "predictor", PredictorConfig(**self.predictor))


# --------------------------------------------------------------------------- masking
def split_regions(n: int, *, mask_ratio: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Random visible / target split of n regions: (n_v,), (n_t,) long, each sorted.

    n_t = round(mask_ratio · n) (halves up), clamped to [1, n − 1]; the draw is one
    `torch.randperm(n, generator=generator)`.
    """
    if n < LatentMIMObjective.min_regions:
        raise ValueError(
            f"LatentMIM needs at least {LatentMIMObjective.min_regions} regions per slide (one visible, one "
            f"target), got {n}; filter smaller slides out (min_regions) before training"
        )
    n_target = min(max(math.floor(mask_ratio * n + 0.5), 1), n - 1)
    perm = torch.randperm(n, generator=generator)
    return perm[n_target:].sort().values, perm[:n_target].sort().values


@dataclass(frozen=True, kw_only=True)
class RegionMasking:
    """The loader-side preparer: adds "visible" and "target" region indices to a sample.

    Picklable (a frozen dataclass), index work only; `regions` and `coords` are
    left untouched (forward indexes them).
    """

    mask_ratio: float = 0.75

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        visible, target = split_regions(int(sample["regions"].shape[0]), mask_ratio=self.mask_ratio,
                                        generator=generator)
        return {**sample, "visible": visible, "target": target}


# --------------------------------------------------------------------------- loss
def patch_discrimination_loss(predictions: Tensor, targets: Tensor, *, tau: float) -> Tensor:
    """LatentMIM's patch discrimination loss within one slide.

    predictions, targets: (T, C), row k of each = the same target token.
    Returns 2τ · mean_k CE(logits[k], k), logits = cos(standardised ẑ_k, z_l) / τ.
    """
    if predictions.shape != targets.shape or predictions.dim() != 2:
        raise ValueError(
            f"predictions and targets must both be (T, C), got {tuple(predictions.shape)}, {tuple(targets.shape)}"
        )
    with torch.autocast(device_type=predictions.device.type, enabled=False):
        pred = predictions.float()
        pred = (pred - pred.mean(dim=0, keepdim=True)) / (pred.std(dim=0, keepdim=True, correction=0) + STANDARDIZE_EPS)
        logits = F.normalize(pred, dim=-1) @ F.normalize(targets.float(), dim=-1).T / tau
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels) * (2 * tau)


def positional_penalty(hidden: Tensor, query_pos: Tensor, *, margin: float) -> Tensor:
    """mean_k relu(cos(hidden_k, query_pos_k) − margin): predictor outputs that echo their position."""
    cos = F.cosine_similarity(hidden.float(), query_pos.float(), dim=-1)
    return F.relu(cos - margin).mean()


# --------------------------------------------------------------------------- monitor
class CollapseMonitor:
    """Warns once when a similarity stays above `threshold` for `window` consecutive updates."""

    def __init__(self, *, threshold: float, window: int, name: str) -> None:
        self.threshold, self.window, self.name = threshold, window, name
        self.recent: deque[float] = deque(maxlen=max(window, 1))
        self.fired = False

    def update(self, value: float, *, step: int) -> str | None:
        """Record one value (NaN is ignored); returns a warning line when the monitor fires."""
        if self.window == 0 or not math.isfinite(value):
            return None
        self.recent.append(value)
        if value <= self.threshold:
            self.fired = False
            return None
        if self.fired or len(self.recent) < self.window or min(self.recent) <= self.threshold:
            return None
        self.fired = True
        return (
            f"collapse warning at step {step}: {self.name} has stayed above {self.threshold:g} for "
            f"{self.window} optimizer steps (now {value:.4f}); the predictor maps target tokens to nearly "
            "identical outputs (thesis §4.2) — see docs/training.md, LatentMIM, for the remedies"
        )


    def state(self) -> dict[str, Tensor]:
        """The recent values (k,) float64 and whether the monitor has fired, as tensors for a checkpoint."""
        return {"recent": torch.tensor(list(self.recent), dtype=torch.float64), "fired": torch.tensor(self.fired)}

    def load(self, state: Mapping[str, Tensor]) -> None:
        self.recent.clear()
        self.recent.extend(float(v) for v in state["recent"].tolist())
        self.fired = bool(state["fired"])


# --------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class _StepResult:
    loss: Tensor
    metrics: dict[str, float]


class LatentMIMObjective(Objective):
    """LatentMIM: a predictor reconstructs the EMA teacher's target tokens from the student's visible ones.

    encoder: a PixelMamba without a head (num_classes = 0); the teacher is its frozen copy.
    """

    name = "latentmim"
    requires_labels = False
    export_source = "teacher"
    has_validation = True
    default_best_metric = None
    min_regions: ClassVar[int] = 2

    def __init__(self, encoder: nn.Module, *, config: LatentMIMConfig) -> None:
        super().__init__()
        if getattr(encoder, "head", None) is not None:
            raise ValueError("LatentMIM trains an encoder without a head: build the model with num_classes=0")
        self.encoder = encoder
        self.teacher = make_teacher(encoder)
        self.config = config
        self.predictor = LatentMIMPredictor(
            config.predictor, embed_dim=int(encoder.embed_dim), spatial_queries=config.cls_loss != "only"
        )
        self._teacher_kwargs: dict[str, Any] = {"region_fusion": config.region_fusion}
        if "random_split" in inspect.signature(self.teacher.forward).parameters:
            self._teacher_kwargs["random_split"] = False
        self._pred_cos = [0.0, 0.0]  # sum, count over this optimizer step's micro-steps
        self._monitor = CollapseMonitor(
            threshold=config.collapse_threshold, window=config.collapse_window, name="predicted-token similarity"
        )
        self._messages: list[str] = []

    # ------------------------------------------------------------- state
    def objective_state_dict(self) -> dict[str, Tensor]:
        """Predictor and teacher, plus the collapse monitor's window (rank 0's), so a resumed run warns
        where the uninterrupted run would."""
        state = super().objective_state_dict()
        state.update({f"monitor.{k}": v for k, v in self._monitor.state().items()})
        return state

    def load_objective_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore `objective_state_dict`; checkpoints from before the monitor was saved load with an empty one."""
        state = dict(state)
        monitor = {k.removeprefix("monitor."): state.pop(k) for k in list(state) if k.startswith("monitor.")}
        super().load_objective_state_dict(state)
        if monitor:
            self._monitor.load(monitor)

    # ------------------------------------------------------------- contract
    def sample_preparer(self) -> RegionMasking:
        return RegionMasking(mask_ratio=self.config.mask_ratio)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher, self.encoder)]

    def exported_encoder(self) -> nn.Module:
        return self.teacher

    def schedules(self, plan: TrainingPlan) -> dict[str, CosineSchedule]:
        cfg = self.config
        return {
            "ema_momentum": CosineSchedule(base=cfg.ema_momentum, final=cfg.ema_momentum_end,
                                           total_steps=plan.total_steps)
        }

    def drain_messages(self) -> list[str]:
        messages, self._messages = self._messages, []
        return messages

    @torch.no_grad()
    def on_after_step(self, ctx: HookContext) -> None:
        totals = ctx.all_reduce_sum(torch.tensor(self._pred_cos, dtype=torch.float64))
        self._pred_cos = [0.0, 0.0]
        if float(totals[1]) > 0:
            message = self._monitor.update(float(totals[0] / totals[1]), step=ctx.step)
            if message is not None:
                self._messages.append(message)

    # ------------------------------------------------------------- training
    def forward(self, sample: Mapping[str, Any], *, step_ctx: StepContext) -> dict[str, Tensor | float]:
        """sample: regions (n, R, R, 3) uint8, coords (n, 2), visible (n_v,), target (n_t,) long."""
        if "visible" not in sample or "target" not in sample:
            raise KeyError(
                f"sample {sample.get('slide_id')!r} has no 'visible'/'target' region indices: the engine's feed "
                "must run the objective's sample_preparer() (RegionMasking) on every training sample"
            )
        result = self._step(sample["regions"], sample["coords"], sample["visible"], sample["target"],
                            generator=step_ctx.generator)
        if self.training and "pred_cos" in result.metrics:
            self._pred_cos[0] += result.metrics["pred_cos"]
            self._pred_cos[1] += 1.0
        return {"loss": result.loss, **result.metrics}

    def _step(
        self, regions: Tensor, coords: Tensor, visible: Tensor, target: Tensor, *, generator: torch.Generator | None
    ) -> _StepResult:
        cfg = self.config
        device = regions.device
        visible, target = visible.to(device), target.to(device)
        coords = coords.to(device)
        student = self.encoder(regions[visible], generator=generator, region_fusion=cfg.region_fusion)
        with torch.no_grad():
            teacher = self.teacher(regions[target], **self._teacher_kwargs)
        grid = tuple(student.spatial_tokens.shape[1:3])
        vis_pos = token_positions(coords[visible], student.region_ids, grid)
        tgt_pos = token_positions(coords[target], teacher.region_ids, grid)

        cls_only = cfg.cls_loss == "only"
        vis_spatial = student.spatial_tokens.flatten(0, 2)
        tgt_spatial = teacher.spatial_tokens.flatten(0, 2)
        if cls_only:
            keys, key_pos = student.cls_tokens, vis_pos.cls
            query_pos, targets = tgt_pos.cls, teacher.cls_tokens
            n_spatial = 0
        else:
            keys = torch.cat([vis_spatial, student.cls_tokens])
            key_pos = torch.cat([vis_pos.spatial.flatten(0, 2), vis_pos.cls])
            query_pos = torch.cat([tgt_pos.spatial.flatten(0, 2), tgt_pos.cls])
            targets = torch.cat([tgt_spatial, teacher.cls_tokens])
            n_spatial = tgt_spatial.shape[0]
        is_cls = torch.arange(query_pos.shape[0], device=device) >= n_spatial
        out = self.predictor(keys, key_pos, query_pos, is_cls)

        in_loss = slice(0, n_spatial) if cfg.cls_loss == "exclude" else slice(None)
        loss = patch_discrimination_loss(out.predictions[in_loss], targets[in_loss].detach(), tau=cfg.tau)
        metrics: dict[str, float] = {}
        if cfg.pos_penalty > 0:
            penalty = positional_penalty(out.hidden[in_loss], out.query_pos[in_loss], margin=cfg.pos_penalty_margin)
            loss = loss + cfg.pos_penalty * penalty
            metrics["pos_penalty"] = float(penalty.detach())
        monitored = slice(None) if cls_only else slice(0, n_spatial)
        similarities = {
            "visible_cos": mean_pairwise_cosine(student.cls_tokens if cls_only else vis_spatial),
            "target_cos": mean_pairwise_cosine(targets[monitored]),
            "pred_cos": mean_pairwise_cosine(out.predictions[monitored]),
        }
        # undefined (NaN) for a single token, e.g. one CLS survivor: left out rather than logged as NaN
        metrics.update({k: v for k, v in similarities.items() if math.isfinite(v)})
        return _StepResult(loss=loss, metrics=metrics)

    # ------------------------------------------------------------- validation
    def validation_step(self, sample: Mapping[str, Any], *, device: torch.device) -> dict[str, Any]:
        regions, coords = sample["regions"], sample["coords"]
        limit = self.config.eval_regions
        if limit and regions.shape[0] > limit:
            keep = torch.linspace(0, regions.shape[0] - 1, limit).round().long().unique().to(regions.device)
            regions, coords = regions[keep], coords[keep.to(coords.device)]
        index = int(sample.get("index", -1))
        record: dict[str, Any] = {
            "index": index,
            "slide_id": str(sample.get("slide_id", "")),
            "label": int(sample.get("label", -1)),
            "loss": float("nan"),
        }
        if regions.shape[0] >= self.min_regions:
            seed = np.random.SeedSequence([self.config.val_seed, max(index, 0)]).generate_state(1)[0]
            visible, target = split_regions(
                regions.shape[0], mask_ratio=self.config.mask_ratio, generator=torch.Generator().manual_seed(int(seed))
            )
            record["loss"] = float(self._step(regions, coords, visible, target, generator=None).loss)
        full = self.teacher(regions, **self._teacher_kwargs)
        tokens = full.spatial_tokens.flatten(0, 2)
        record.update(
            embedding=full.embedding.float().cpu().tolist(),
            token_cos=mean_pairwise_cosine(tokens),
            token_rankme=rankme(tokens),
            region_cos=mean_pairwise_cosine(full.cls_tokens),
            region_rankme=rankme(full.cls_tokens),
        )
        return record

    def validation_metric_names(self) -> set[str]:
        names = {"loss", "slide_rankme", "slide_cos", "region_rankme", "region_cos", "token_rankme", "token_cos"}
        if self.config.probe_validation:
            names |= PROBE_VALIDATION_METRICS
        return names

    def validation_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        embeddings = np.stack([np.asarray(r["embedding"], dtype=np.float64) for r in records])

        def mean_of(key: str) -> float:
            values = np.array([r[key] for r in records], dtype=np.float64)
            values = values[np.isfinite(values)]
            return float(values.mean()) if values.size else float("nan")

        metrics = {
            "loss": mean_of("loss"),
            "slide_rankme": rankme(embeddings),
            "slide_cos": mean_pairwise_cosine(embeddings),
            "region_rankme": mean_of("region_rankme"),
            "region_cos": mean_of("region_cos"),
            "token_rankme": mean_of("token_rankme"),
            "token_cos": mean_of("token_cos"),
        }
        if self.config.probe_validation:
            metrics.update(probe_validation_metrics(records))
        return metrics
