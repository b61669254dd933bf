"""A long run never loses its work: non-finite gradients and weights, checkpoint order, settings on resume,
teacher export, per-metric counts, fsync."""

from __future__ import annotations

import os

import pytest
import torch
from engine_data import ColourSlides, ParamObjective

from trainer.engine import checkpoint as ckpt
from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, NonFiniteGradientError, Trainer, TrainingStopped
from trainer.engine.optim import OptimConfig
from trainer.models import build_model
from trainer.objectives.supervised import SupervisedConfig, SupervisedObjective


def make(objective, tmp_path, *, val=None, samples=6, **loop) -> Trainer:
    settings = dict(epochs=2, accum_steps=2, tensorboard=False, progress=False) | loop
    return Trainer(
        objective, train=SlideFeed(ColourSlides(samples, size=4), seed=0), val=val,
        optim_config=OptimConfig(lr=1e-2, weight_decay=0.0), loop_config=LoopConfig(**settings),
        out_dir=tmp_path, device=torch.device("cpu"),
    )


def test_non_finite_gradient_norm_stops_before_the_step(tmp_path) -> None:
    objective = ParamObjective("inf_grad")
    weights = objective.encoder.weight.detach().clone()
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient norm .* at optimizer step 0"):
        make(objective, tmp_path, clip_grad=None).fit()
    assert torch.equal(objective.encoder.weight, weights)
    assert not (tmp_path / "last.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path) -> None:
    objective = ParamObjective()
    trainer = make(objective, tmp_path)
    with torch.no_grad():
        objective.encoder.bias[0] = float("nan")
    with pytest.raises(TrainingStopped, match="non-finite weights .*bias"):
        trainer._save(ckpt.LAST)
    assert not (tmp_path / "last.pt").exists()


class SupervisedTiny(SupervisedObjective):
    fail_validation = False

    def validation_step(self, sample, *, device):
        if self.fail_validation:
            raise RuntimeError("validation broke")
        return super().validation_step(sample, device=device)


def supervised(tmp_path, **loop) -> Trainer:
    torch.manual_seed(0)
    model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
    objective = SupervisedTiny(model, label_map={"a": 0, "b": 1}, config=SupervisedConfig())
    settings = dict(epochs=2, accum_steps=2, tensorboard=False, progress=False) | loop
    return Trainer(
        objective, train=SlideFeed(ColourSlides(4), seed=0), val=SlideFeed(ColourSlides(2, offset=50), shuffle=False),
        optim_config=OptimConfig(lr=1e-3), loop_config=LoopConfig(**settings), out_dir=tmp_path,
        device=torch.device("cpu"),
    )


def test_last_checkpoint_is_written_before_validation(tmp_path) -> None:
    trainer = supervised(tmp_path)
    trainer.objective.fail_validation = True
    with pytest.raises(RuntimeError, match="validation broke"):
        trainer.fit()
    payload = load_checkpoint(tmp_path / "last.pt")
    assert (payload["step"], payload["epoch"], payload["position"]) == (2, 1, 0)  # the epoch's work is kept


def test_best_metric_is_checked_at_start_up_and_never_picks_nan(tmp_path) -> None:
    with pytest.raises(ValueError, match="'qwk_typo' is not a validation metric .* balanced_accuracy"):
        supervised(tmp_path, best_metric="qwk_typo")
    with pytest.raises(ValueError, match="needs validation"):
        make(ParamObjective(), tmp_path, best_metric="loss")
    trainer = supervised(tmp_path / "b", best_metric="accuracy")
    assert not trainer._is_better({"accuracy": float("nan")}) and trainer.state.best_value is None
    assert trainer._is_better({"accuracy": 0.5})


def test_resume_refuses_changed_settings_unless_allowed(tmp_path) -> None:
    first = make(ParamObjective(), tmp_path / "a", max_steps=1).fit()  # mid-epoch: position 2 of 6
    payload = load_checkpoint(first.last_checkpoint)
    assert payload["settings"]["seed"] == 0 and payload["position"] == 2
    with pytest.raises(ckpt.CheckpointError, match=r"seed 0 → 1, epochs 2 → 3.*--allow-changed-settings"):
        make(ParamObjective(), tmp_path / "b", seed=1, epochs=3).load_state(payload)
    trainer = make(ParamObjective(), tmp_path / "c", seed=1, epochs=3)
    result = trainer.fit(resume=payload, allow_changed_settings=True)
    assert "restarting at epoch 1, step 1" in result.messages[0]
    assert result.state.step == 1 + 2 * 3 and result.state.epoch == 3  # epochs 1 and 2 of the new plan


def test_resuming_a_finished_run_says_so_and_a_higher_max_steps_continues(tmp_path) -> None:
    done = make(ParamObjective(), tmp_path, max_steps=2).fit()
    payload = load_checkpoint(done.last_checkpoint)
    again = make(ParamObjective(), tmp_path, max_steps=2).fit(resume=payload)
    assert again.already_finished and again.history == []
    more = make(ParamObjective(), tmp_path, max_steps=4).fit(resume=payload)
    assert not more.already_finished and more.state.step == 4


class SometimesMetric(ParamObjective):
    def forward(self, sample, *, step_ctx):
        out = super().forward(sample, step_ctx=step_ctx)
        if step_ctx.position % 2 == 0:
            out["even_only"] = torch.tensor(float(step_ctx.position))
        out["always"] = torch.tensor(1.0)
        return out


def test_each_metric_is_averaged_over_its_own_count(tmp_path) -> None:
    result = make(SometimesMetric(), tmp_path, accum_steps=3, epochs=1).fit()
    assert [row["even_only"] for row in result.history] == [(0 + 2) / 2, 4.0]  # not divided by 3
    assert [row["always"] for row in result.history] == [1.0, 1.0]


class TeacherExport(ParamObjective):
    export_source = "teacher"

    def exported_encoder(self):
        return self.teacher


class ClashingExtras(ParamObjective):
    def checkpoint_extras(self):
        return {"model": {}}


def seeded_teacher_export() -> TeacherExport:
    torch.manual_seed(0)
    return TeacherExport(teacher=True)


def test_teacher_export_and_resume_from_the_student(tmp_path) -> None:
    full = make(seeded_teacher_export(), tmp_path / "full").fit()
    objective = seeded_teacher_export()
    cut = make(objective, tmp_path / "cut", max_steps=2).fit()
    payload = load_checkpoint(cut.last_checkpoint)
    assert payload["model_source"] == "teacher"
    assert all(torch.equal(payload["model"][k], v) for k, v in objective.teacher.state_dict().items())
    assert all(torch.equal(payload["student"][k], v) for k, v in objective.encoder.state_dict().items())
    torch.manual_seed(123)
    resumed = make(TeacherExport(teacher=True), tmp_path / "cut").fit(resume=payload)
    assert [r["loss"] for r in cut.history + resumed.history] == pytest.approx([r["loss"] for r in full.history])
    end_full, end_cut = load_checkpoint(full.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert all(torch.allclose(end_full["model"][k], end_cut["model"][k]) for k in end_full["model"])
    with pytest.raises(ValueError, match="may not overwrite \\['model'\\]"):
        make(ClashingExtras(), tmp_path / "x").state_payload()


def test_checkpoints_fsync_the_file_and_the_folder(tmp_path, monkeypatch) -> None:
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.isdir(f"/proc/self/fd/{fd}")), real(fd)))
    ckpt.atomic_save({"model": {}}, tmp_path / "last.pt")
    assert synced == [False, True]
    ckpt.atomic_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    assert synced[2:] == [False, True]
