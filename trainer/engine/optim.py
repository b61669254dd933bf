"""AdamW with weight-decay groups.

No weight decay on: 1-D parameters (norm weights, biases, A_log and D are 1-D or
flagged), parameters flagged `_no_weight_decay = True` by the model (A_log, D),
learned tokens and positional embeddings (by name), and any names the objective
lists in `no_weight_decay_names()`. Each group carries `wd_scale` (1 or 0) and
`lr_scale` so the engine can apply per-iteration schedules to every group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Name fragments of learned tokens/embeddings that must not decay.
NO_DECAY_NAME_PARTS = ("cls_token", "pos_embed", "mask_token", "query_token", "token")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer and schedule settings.

    lr: peak learning rate after warm-up; min_lr: the cosine's end value.
    weight_decay → weight_decay_end: cosine (equal values: constant).
    warmup_epochs: linear warm-up from warmup_lr to lr; warmup_steps overrides it when set.
    lr_scale_batch: when > 0, lr and min_lr are multiplied by effective_batch / lr_scale_batch
        (DeiT: lr 5e-4 · batch / 512 → lr = 5e-4, lr_scale_batch = 512).
    """

    lr: float = 4e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_scale_batch: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


def is_no_decay(name: str, param: nn.Parameter, extra_names: Iterable[str] = ()) -> bool:
    """True when `param` (called `name` in its module) must not be weight-decayed."""
    if param.ndim <= 1 or getattr(param, "_no_weight_decay", False):
        return True
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or any(part in leaf for part in NO_DECAY_NAME_PARTS):
        return True
    return name in set(extra_names)


def param_groups(module: nn.Module, *, extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups over `module`'s trainable parameters: decay and no-decay.

    Returns [{"name": "decay", "params": [...], "wd_scale": 1.0, "lr_scale": 1.0},
             {"name": "no_decay", "params": [...], "wd_scale": 0.0, "lr_scale": 1.0}]
    (empty groups dropped). Frozen parameters (EMA teachers) are left out.
    """
    extra = set(extra_no_decay)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param, extra) else decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "wd_scale": 1.0, "lr_scale": 1.0},
        {"name": "no_decay", "params": no_decay, "wd_scale": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def build_adamw(groups: list[dict], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `groups`; lr and weight decay are set per step by `apply_schedule_values`."""
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    for group in groups:
        group["weight_decay"] = config.weight_decay * group.get("wd_scale", 1.0)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def apply_schedule_values(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float) -> None:
    """Set this step's lr and weight decay on every group (scaled by its lr_scale/wd_scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
