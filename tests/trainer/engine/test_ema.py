"""EMA teachers: the exact update, the refusals, no update on a skipped step, no gradient for the teacher."""

from __future__ import annotations

import pytest
import torch
from engine_data import ColourSlides, ParamObjective

from trainer.engine.ema import EMAPairError, check_ema_pairs, ema_update
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, SkippedStepsError, Trainer
from trainer.engine.optim import OptimConfig
from trainer.objectives.base import make_teacher


class WithBuffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_update_is_exact_over_parameters_and_buffers() -> None:
    student = WithBuffers()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.running.fill_(2.0)
        student.count.fill_(7)
    expected = {k: 0.75 * v + 0.25 * student.state_dict()[k] for k, v in teacher.state_dict().items() if v.is_floating_point()}
    ema_update([(teacher, student)], 0.75)
    for key, value in expected.items():
        assert torch.equal(teacher.state_dict()[key], value), key
    assert int(teacher.count) == 7  # integer buffers are copied
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    with pytest.raises(ValueError, match="momentum"):
        ema_update([(teacher, student)], 1.5)


def test_non_persistent_buffers_are_left_alone() -> None:
    """They are not in the checkpoint: averaging them (m·x + (1−m)·x ≠ x in float) breaks exact resume."""
    student = WithBuffers()
    student.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]), persistent=False)
    teacher = make_teacher(student)
    before = teacher.mean.clone()
    with torch.no_grad():
        student.mean.add_(1.0)
    for _ in range(5):
        ema_update([(teacher, student)], 0.996)
    assert torch.equal(teacher.mean, before)


def test_pairs_that_cannot_be_averaged_are_refused() -> None:
    student = WithBuffers()
    with pytest.raises(EMAPairError, match="differ by name"):
        check_ema_pairs([(torch.nn.Linear(3, 2), student)], set())
    with pytest.raises(EMAPairError, match="require gradients"):
        check_ema_pairs([(WithBuffers(), student)], set())
    teacher = make_teacher(student)
    with pytest.raises(EMAPairError, match="in the optimizer"):
        check_ema_pairs([(teacher, student)], {id(p) for p in teacher.parameters()})


def make(objective, tmp_path, **loop) -> Trainer:
    settings = dict(epochs=1, accum_steps=2, tensorboard=False, progress=False, clip_grad=None) | loop
    return Trainer(
        objective, train=SlideFeed(ColourSlides(6, size=4), seed=0), val=None,
        optim_config=OptimConfig(lr=1e-2, weight_decay=0.0), loop_config=LoopConfig(**settings),
        out_dir=tmp_path, device=torch.device("cpu"),
    )


def test_engine_updates_the_teacher_after_each_step(tmp_path) -> None:
    torch.manual_seed(0)
    objective = ParamObjective(teacher=True)
    trainer = make(objective, tmp_path, max_steps=1)
    assert not any(p is q for g in trainer.optimizer.param_groups for p in g["params"] for q in objective.teacher.parameters())
    before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    trainer.fit()
    m = trainer.schedules["ema_momentum"](0)
    student = objective.encoder.state_dict()
    for key, value in objective.teacher.state_dict().items():
        assert torch.allclose(value, m * before[key] + (1 - m) * student[key], atol=0, rtol=1e-6), key
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert [ctx.skipped for ctx in objective.after] == [False]


def test_skipped_fp16_steps_leave_the_teacher_and_stop_after_a_run_of_them(tmp_path) -> None:
    torch.manual_seed(0)
    objective = ParamObjective("overflow", teacher=True)
    trainer = make(objective, tmp_path, max_skipped_steps=3)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # scaled gradients overflow fp32
    teacher = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    weights = objective.encoder.weight.detach().clone()
    with pytest.raises(SkippedStepsError, match="skipped 3 optimizer steps in a row"):
        trainer.fit()
    assert [ctx.skipped for ctx in objective.after] == [True, True, True]
    assert all(torch.equal(v, teacher[k]) for k, v in objective.teacher.state_dict().items())
    assert torch.equal(objective.encoder.weight, weights)
