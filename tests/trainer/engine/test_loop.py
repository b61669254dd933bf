"""The training loop on the real tiny model: exact resume, non-finite stop, hooks and schedules."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from engine_data import ColourSlides

from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, NonFiniteLossError, Trainer
from trainer.engine.optim import OptimConfig, apply_schedule_values
from trainer.schedules import CosineSchedule
from trainer.models import build_model
from trainer.objectives.base import Objective, StepContext, TrainingPlan
from trainer.objectives.supervised import SupervisedConfig, SupervisedObjective


def make_trainer(out_dir, *, objective=None, init_seed=0, **loop) -> Trainer:
    torch.manual_seed(init_seed)
    if objective is None:
        model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
        objective = SupervisedObjective(model, label_map={"a": 0, "b": 1}, config=SupervisedConfig())
    settings = dict(epochs=2, accum_steps=2, tensorboard=False, progress=False, seed=0) | loop
    return Trainer(
        objective,
        train=SlideFeed(ColourSlides(4), seed=0),
        val=SlideFeed(ColourSlides(2, offset=100), shuffle=False),
        optim_config=OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.05),
        loop_config=LoopConfig(**settings),
        out_dir=out_dir,
        device=torch.device("cpu"),
    )


def test_resume_reproduces_the_uninterrupted_losses(tmp_path) -> None:
    full = make_trainer(tmp_path / "full").fit()
    assert [row["lr"] for row in full.history][:2] == [1e-6, 2e-3]  # warm-up, then the peak
    assert len(full.history) == 4 and len(full.validations) == 2

    first = make_trainer(tmp_path / "cut", max_steps=1).fit()  # stops mid-epoch (2 of 4 slides)
    assert len(first.history) == 1
    payload = load_checkpoint(first.last_checkpoint)
    assert (payload["step"], payload["epoch"], payload["position"]) == (1, 0, 2)
    resumed = make_trainer(tmp_path / "cut", init_seed=123).fit(resume=payload)

    losses = [row["loss"] for row in first.history + resumed.history]
    expected = [row["loss"] for row in full.history]
    assert losses == pytest.approx(expected, abs=1e-6, rel=0)
    assert len(set(round(v, 6) for v in expected)) > 1  # a real trajectory, not a constant
    assert [v["accuracy"] for v in resumed.validations] == [v["accuracy"] for v in full.validations]
    end_full = load_checkpoint(full.last_checkpoint)["model"]
    end_resumed = load_checkpoint(resumed.last_checkpoint)["model"]
    assert all(torch.allclose(end_full[k], end_resumed[k], atol=1e-6) for k in end_full)

    with open(tmp_path / "cut" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows if r["phase"] == "train"] == [1, 2, 3, 4]
    assert (tmp_path / "cut" / "best.pt").exists() and (tmp_path / "cut" / "tensorboard").exists() is False


class NaNOnSlide(SupervisedObjective):
    """Supervised objective whose loss turns NaN on one slide."""

    bad = "s3"

    def forward(self, sample, *, step_ctx):
        out = super().forward(sample, step_ctx=step_ctx)
        if sample["slide_id"] == self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_non_finite_loss_stops_naming_step_and_slide(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
    objective = NaNOnSlide(model, label_map={"a": 0, "b": 1}, config=SupervisedConfig())
    trainer = make_trainer(tmp_path, objective=objective, checkpoint_every=1)
    order = trainer.train_source.indices(0).tolist()
    bad_step = order.index(3) // 2
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    assert f"non-finite loss at optimizer step {bad_step}" in str(err.value) and "'s3'" in str(err.value)
    if bad_step > 0:  # the last good state is what last.pt holds
        assert load_checkpoint(tmp_path / "last.pt")["step"] == bad_step
    assert all(torch.isfinite(p).all() for p in model.parameters())


class EMATeacherObjective(Objective):
    """A DINO/LatentMIM-shaped objective: two forward passes, an EMA teacher, a momentum schedule."""

    name = "ema_test"

    def __init__(self) -> None:
        super().__init__()
        self.encoder = build_model("pixel_mamba_tiny", region_size=16)
        self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)
        self.register_buffer("centre", torch.zeros(self.encoder.embed_dim))
        self.seen: list[tuple[int, float, float]] = []
        self.after: list[int] = []

    def schedules(self, plan: TrainingPlan) -> dict[str, CosineSchedule]:
        self.momentum = CosineSchedule(base=0.9, final=1.0, total_steps=plan.total_steps)
        return {"ema_momentum": self.momentum}

    def forward(self, sample, *, step_ctx: StepContext):
        regions = sample["regions"]
        student = self.encoder(regions, generator=step_ctx.generator).embedding
        with torch.no_grad():
            target = self.teacher(regions.flip(1)).embedding
            self.centre.mul_(0.9).add_(0.1 * target)
        self.seen.append((step_ctx.step, step_ctx.values["ema_momentum"], step_ctx.values["lr"]))
        loss = 1 - torch.cosine_similarity(student, target - self.centre, dim=0)
        return {"loss": loss, "centre_norm": self.centre.norm()}

    @torch.no_grad()
    def on_after_step(self, ctx) -> None:
        step = ctx.step
        m = self.momentum(step)
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            t.mul_(m).add_((1 - m) * s.detach())
        self.after.append(step)


def test_objective_hooks_schedules_and_teacher_state(tmp_path) -> None:
    objective = EMATeacherObjective()
    teacher_before = [p.clone() for p in objective.teacher.parameters()]
    trainer = make_trainer(tmp_path, objective=objective, epochs=1, max_steps=2)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in objective.teacher.parameters())
    result = trainer.fit()
    assert objective.after == [0, 1]
    assert [s for s, _, _ in objective.seen] == [0, 0, 1, 1]
    assert objective.seen[0][1] == pytest.approx(0.9) and objective.seen[2][1] > 0.9
    assert "centre_norm" in result.history[0]
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, objective.teacher.parameters()))
    payload = load_checkpoint(result.last_checkpoint)
    assert payload["objective_name"] == "ema_test"
    assert "centre" in payload["objective"] and any(k.startswith("teacher.") for k in payload["objective"])
    assert not any(k.startswith("encoder.") for k in payload["objective"])


class HintedObjective(SupervisedObjective):
    def param_group_hints(self):
        return {"encoder.cls_token": {"lr_scale": 10.0}}

    def no_weight_decay_names(self):
        return ["encoder.head.weight"]


def test_param_group_hints_get_their_own_groups(tmp_path) -> None:
    model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
    objective = HintedObjective(model, label_map={"a": 0, "b": 1}, config=SupervisedConfig())
    trainer = make_trainer(tmp_path, objective=objective)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"decay", "no_decay", "encoder.cls_token"}
    assert groups["encoder.cls_token"]["params"] == [model.cls_token]
    assert any(p is model.head.weight for p in groups["no_decay"]["params"])
    apply_schedule_values(trainer.optimizer, lr=1e-3, weight_decay=0.1)
    assert groups["encoder.cls_token"]["lr"] == pytest.approx(1e-2) and groups["decay"]["lr"] == 1e-3
    assert groups["encoder.cls_token"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1


def test_best_checkpoint_on_a_loss_keeps_the_lowest(tmp_path) -> None:
    trainer = make_trainer(tmp_path, best_metric="loss")  # supervised objective: best_mode "max" for qwk/bacc
    assert trainer.best_mode == "min"
    assert trainer._is_better({"loss": 0.5, "accuracy": 0.5})
    assert not trainer._is_better({"loss": 0.7, "accuracy": 0.9})
    assert trainer._is_better({"loss": 0.3, "accuracy": 0.1}) and trainer.state.best_value == 0.3
    assert make_trainer(tmp_path / "acc", best_metric="accuracy").best_mode == "max"


def test_validation_forks_the_rng_of_this_ranks_gpu(tmp_path, monkeypatch) -> None:
    """Under torchrun the device is "cuda" (no index) and the rank's GPU is the current device."""
    trainer = make_trainer(tmp_path)
    trainer.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    forked = []

    class Forked(Exception):
        pass

    def fork_rng(devices=(), **kwargs):
        forked.append(list(devices))
        raise Forked

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    with pytest.raises(Forked):
        trainer.validate()
    assert forked == [[3]]  # not GPU 0, which belongs to rank 0


def test_resume_keeps_the_best_value_only_for_the_same_metric(tmp_path) -> None:
    first = make_trainer(tmp_path / "a", max_steps=2).fit()  # one epoch, validated: best balanced_accuracy
    payload = load_checkpoint(first.last_checkpoint)
    assert payload["metrics"]["best_metric"] == "balanced_accuracy" and payload["metrics"]["best_value"] is not None
    same = make_trainer(tmp_path / "b")
    same.load_state(payload)
    assert same.state.best_value == payload["metrics"]["best_value"]
    other = make_trainer(tmp_path / "c", best_metric="loss")  # e.g. a 1.0 accuracy must not become the loss to beat
    other.load_state(payload)
    assert other.state.best_value is None


def test_last_epoch_always_validates(tmp_path) -> None:
    result = make_trainer(tmp_path, epochs=3, validate_every=2).fit()
    assert [v["epoch"] for v in result.validations] == [1, 2]  # every 2nd epoch, and the last
