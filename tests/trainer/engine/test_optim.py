"""AdamW groups: no decay on 1-D params, biases, norms, A_log, D and tokens; schedules applied per group."""

from __future__ import annotations

import torch

from trainer.engine.optim import OptimConfig, apply_schedule_values, build_adamw, param_groups
from trainer.models import build_model


def test_groups_on_the_tiny_model() -> None:
    model = build_model("pixel_mamba_tiny", num_classes=3, region_size=16)
    groups = {g["name"]: g for g in param_groups(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in no_decay:
        assert any(key in name for key in ("A_log", "D", "bias", "norm", "cls_token")), name
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith(".D") for n in no_decay)
    assert "cls_token" in no_decay and "head.bias" in no_decay and "norm.weight" in no_decay
    assert "head.weight" in decay
    for name in decay:
        param = dict(model.named_parameters())[name]
        assert param.ndim >= 2 and not getattr(param, "_no_weight_decay", False), name


def test_flagged_and_named_and_frozen_parameters() -> None:
    module = torch.nn.Module()
    module.proj = torch.nn.Linear(4, 4)
    module.A_log = torch.nn.Parameter(torch.zeros(4, 2))
    module.A_log._no_weight_decay = True
    module.pos_embed = torch.nn.Parameter(torch.zeros(1, 3, 4))
    module.special = torch.nn.Parameter(torch.zeros(2, 2))
    module.teacher = torch.nn.Linear(4, 4).requires_grad_(False)
    groups = {g["name"]: g for g in param_groups(module, extra_no_decay=["special"])}
    assert [p.shape for p in groups["decay"]["params"]] == [torch.Size([4, 4])]
    assert len(groups["no_decay"]["params"]) == 4  # bias, A_log, pos_embed, special; teacher left out


def test_schedule_values_respect_group_scales() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = build_adamw(param_groups(model), OptimConfig(lr=1e-3, weight_decay=0.05))
    apply_schedule_values(optimizer, lr=2e-4, weight_decay=0.3)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["decay"]["lr"] == by_name["no_decay"]["lr"] == 2e-4
    assert by_name["decay"]["weight_decay"] == 0.3 and by_name["no_decay"]["weight_decay"] == 0.0
