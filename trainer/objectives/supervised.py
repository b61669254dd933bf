"""Supervised slide classification: mean-pooled CLS → linear head → cross-entropy.

The head is the model's own (`build_model(..., num_classes=K)`): `model(regions).logits`
is `head(mean of the surviving regions' CLS tokens)`. The checkpoint's "model" is
therefore a complete classifier; an encoder without the head is the same
variant built with `num_classes=0` and loaded with `load_encoder_weights`
(which leaves out the `head.` keys). Initialising a run from another checkpoint
(`--init`, e.g. ImageNet- or SSL-pretrained) does the same: every encoder weight
is copied, the head starts fresh.

Targets: the sample's `target` (K,) soft label when present (Mixup/CutMix in
image-folder mode: soft cross-entropy), else its integer `label` with optional
label smoothing. Validation: accuracy, balanced accuracy and quadratic weighted
kappa (all K labels passed to sklearn; reported only when the labels are
ordinal: the label map is integers mapping to themselves, as ISUP grades 0–5,
or `ordinal = true`). The best checkpoint follows QWK for ordinal labels, else
balanced accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.objectives.base import Objective, StepContext, encode_packed


@dataclass(frozen=True, kw_only=True)
class SupervisedConfig:
    """Supervised settings.

    label_smoothing: ε for hard labels; ordinal: None = decide from the label map.
    train_regions: at most this many regions of a slide per training step (a random
        subset in grid order, drawn from the step's generator); 0 = all. A time and
        memory cap (CPU demo, huge slides).
    eval_regions: at most this many regions per validation slide (evenly spaced in
        grid order, the same every time); 0 = all (the default: real runs validate
        on whole slides).
    """

    label_smoothing: float = 0.0
    ordinal: bool | None = None
    train_regions: int = 0
    eval_regions: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.train_regions < 0 or self.eval_regions < 0:
            raise ValueError(
                f"train_regions and eval_regions must be >= 0, got {self.train_regions}, {self.eval_regions}"
            )


def is_ordinal(label_map: Mapping[str, int]) -> bool:
    """True when every label is the decimal string of its own id (ISUP grades, say)."""
    return bool(label_map) and all(str(v) == str(k) for k, v in label_map.items())


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """accuracy, balanced_accuracy (mean recall over the classes present) and qwk.

    labels, predictions: (N,) int class ids. qwk is NaN when undefined (one class only).
    """
    from sklearn.metrics import cohen_kappa_score

    if len(labels) == 0:
        return {}
    with np.errstate(invalid="ignore", divide="ignore"):
        qwk = cohen_kappa_score(labels, predictions, weights="quadratic", labels=list(range(num_classes)))
    # sklearn's balanced_accuracy_score, without its warning when predictions hold unseen classes
    recalls = [float(np.mean(predictions[labels == c] == c)) for c in np.unique(labels)]
    return {
        "accuracy": float(np.mean(labels == predictions)),
        "balanced_accuracy": float(np.mean(recalls)),
        "qwk": float(qwk),
    }


class SupervisedObjective(Objective):
    """Cross-entropy on slide labels.

    encoder: a PixelMamba built with `num_classes = len(classes)` (its head gives the logits).
    label_map: {label: class id} (recorded in checkpoints).
    """

    name = "supervised"
    has_validation = True

    def __init__(self, encoder: torch.nn.Module, *, label_map: Mapping[str, int], config: SupervisedConfig) -> None:
        super().__init__()
        num_classes = int(getattr(encoder.config, "num_classes", 0))
        if num_classes < 2:
            raise ValueError(f"supervised training needs a model with a head of >= 2 classes, got {num_classes}")
        if label_map and max(label_map.values()) >= num_classes:
            raise ValueError(f"label map ids go up to {max(label_map.values())} but the head has {num_classes} classes")
        self.encoder = encoder
        self.num_classes = num_classes
        self.label_map = {str(k): int(v) for k, v in label_map.items()}
        self.config = config
        self.ordinal = is_ordinal(self.label_map) if config.ordinal is None else config.ordinal
        self.default_best_metric = "qwk" if self.ordinal else "balanced_accuracy"

    def forward(self, sample: Mapping[str, Any], *, step_ctx: StepContext) -> dict[str, torch.Tensor]:
        """sample: regions (n, R, R, 3) uint8, label long scalar, optional target (K,) float;
        or a micro-batch (`segments` (B·n,), label (B,), target (B, K); see trainer.data.collate):
        the mean loss over its B samples, each encoded with its own generator."""
        if "segments" in sample:
            return self._forward_batch(sample, step_ctx)
        regions = sample["regions"]
        limit = self.config.train_regions
        if limit and regions.shape[0] > limit:
            keep = torch.randperm(regions.shape[0], generator=step_ctx.generator)[:limit].sort().values
            regions = regions[keep.to(regions.device)]
        logits = self.encoder(regions, generator=step_ctx.generator).logits.float()
        label = sample["label"].reshape(()).long()
        target = sample.get("target")
        if target is not None:
            target = target.float().reshape(-1)
            loss = -(target * F.log_softmax(logits, dim=-1)).sum()
            correct = logits.argmax() == target.argmax()
        else:
            if int(label) < 0:
                raise ValueError(f"slide {sample.get('slide_id')!r} has no label; supervised training needs one")
            loss = F.cross_entropy(logits[None], label[None], label_smoothing=self.config.label_smoothing)
            correct = logits.argmax() == label
        return {"loss": loss, "accuracy": correct.float().detach()}

    def _forward_batch(self, sample: Mapping[str, Any], step_ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = sample["label"].reshape(-1).long()
        generators = list(step_ctx.generators) or [step_ctx.generator] * labels.numel()
        outputs = encode_packed(self.encoder, sample["regions"], sample["segments"], generators)
        logits = torch.stack([o.logits.float() for o in outputs])
        target = sample.get("target")
        if target is not None:
            target = target.float().reshape(logits.shape)
            loss = -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
            correct = logits.argmax(dim=-1) == target.argmax(dim=-1)
        else:
            if (labels < 0).any():
                missing = [s for s, y in zip(sample.get("slide_id", []), labels.tolist()) if y < 0]
                raise ValueError(f"samples {missing!r} have no label; supervised training needs one")
            loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
            correct = logits.argmax(dim=-1) == labels
        return {"loss": loss, "accuracy": correct.float().mean().detach()}

    def regions_per_step(self, n_regions: int) -> float:
        limit = self.config.train_regions
        return float(min(n_regions, limit) if limit else n_regions)

    def validation_metric_names(self) -> set[str]:
        names = {"accuracy", "balanced_accuracy", "loss"}
        return names | {"qwk"} if self.ordinal else names

    def validation_step(self, sample: Mapping[str, Any], *, device: torch.device) -> dict[str, Any]:
        regions = sample["regions"]
        limit = self.config.eval_regions
        if limit and regions.shape[0] > limit:
            keep = torch.linspace(0, regions.shape[0] - 1, limit).round().long().unique()
            regions = regions[keep.to(regions.device)]
        logits = self.encoder(regions).logits.float()
        label = int(sample["label"])
        loss = float(F.cross_entropy(logits[None], torch.tensor([max(label, 0)], device=logits.device)))
        return {
            "index": int(sample.get("index", -1)),
            "slide_id": str(sample.get("slide_id", "")),
            "label": label,
            "prediction": int(logits.argmax()),
            "loss": loss,
        }

    def validation_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        labelled = [r for r in records if r["label"] >= 0]
        if not labelled:
            return {}
        labels = np.array([r["label"] for r in labelled])
        predictions = np.array([r["prediction"] for r in labelled])
        metrics = classification_metrics(labels, predictions, self.num_classes)
        if not self.ordinal:  # kappa's quadratic weights mean nothing for unordered classes
            metrics.pop("qwk")
        metrics["loss"] = float(np.mean([r["loss"] for r in labelled]))
        return metrics

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"label_map": dict(self.label_map), "num_classes": self.num_classes}
