"""LatentMIM: masking, the loss against a slow reference, the predictor, monitors, and a tiny training run."""

from __future__ import annotations

import math
import pickle
import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.conftest import write_stain_store
from trainer.data.tile_dataset import TileStoreDataset
from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.config import DataConfig, section
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, Trainer
from trainer.engine.optim import OptimConfig
from trainer.models import build_model
from trainer.objectives import OBJECTIVES, BuildContext
from trainer.objectives.base import STREAM_PREPARE, HookContext, StepContext, TrainingPlan
from trainer.objectives.latentmim import (
    CollapseMonitor,
    LatentMIMConfig,
    LatentMIMObjective,
    RegionMasking,
    patch_discrimination_loss,
    positional_penalty,
    split_regions,
)
from trainer.objectives.latentmim_predictor import LatentMIMPredictor, PredictorConfig

REPO = Path(__file__).resolve().parents[3]
SMALL_PREDICTOR = PredictorConfig(width=32, depth=2, heads=4, mlp_ratio=2.0)


def small_objective(seed: int = 0, **config) -> LatentMIMObjective:
    torch.manual_seed(seed)
    encoder = build_model("pixel_mamba_tiny", region_size=16)
    return LatentMIMObjective(encoder, config=LatentMIMConfig(predictor=SMALL_PREDICTOR, **config))


def grid_sample(n: int = 8, *, seed: int = 0, size: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "regions": torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
        "coords": torch.stack([torch.arange(n) // 4, torch.arange(n) % 4], dim=1),
        "label": torch.tensor(-1),
        "slide_id": f"slide{seed}",
        "index": seed,
    }


def step_ctx(seed: int = 1) -> StepContext:
    return StepContext(step=0, epoch=0, position=0, micro_step=0, accum_steps=1, device=torch.device("cpu"),
                       values={}, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ masking
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("n", [2, 3, 4, 7, 10, 101])
def test_masking_ratio_disjointness_and_coverage(n: int, ratio: float) -> None:
    visible, target = split_regions(n, mask_ratio=ratio, generator=torch.Generator().manual_seed(n))
    assert len(target) == min(max(math.floor(ratio * n + 0.5), 1), n - 1)
    assert len(visible) >= 1 and len(target) >= 1
    assert set(visible.tolist()).isdisjoint(target.tolist())
    assert sorted(visible.tolist() + target.tolist()) == list(range(n))
    assert torch.equal(visible, visible.sort().values) and torch.equal(target, target.sort().values)
    assert visible.dtype == target.dtype == torch.long


def test_masking_is_a_function_of_the_generator_and_survives_pickling() -> None:
    prepare = RegionMasking(mask_ratio=0.75)
    sample = grid_sample(40)
    first = prepare(sample, torch.Generator().manual_seed(7))
    again = pickle.loads(pickle.dumps(prepare))(sample, torch.Generator().manual_seed(7))
    other = prepare(sample, torch.Generator().manual_seed(8))
    assert torch.equal(first["target"], again["target"]) and torch.equal(first["visible"], again["visible"])
    assert not torch.equal(first["target"], other["target"])
    assert first["regions"] is sample["regions"] and "visible" not in sample  # index work only, input untouched
    assert len(first["target"]) == 30


class PreparedSlides(torch.utils.data.Dataset):
    """Runs the preparer the way the engine's feed does: one generator per (seed, epoch, position, rank, stream)."""

    def __init__(self, n: int) -> None:
        self.n, self.prepare = n, RegionMasking(mask_ratio=0.75)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        seed = np.random.SeedSequence([0, 0, index, 0, STREAM_PREPARE]).generate_state(1)[0]
        return self.prepare(grid_sample(5 + index, seed=index), torch.Generator().manual_seed(int(seed)))


@pytest.mark.parametrize("workers", [1, 2])
def test_masks_are_identical_with_and_without_dataloader_workers(workers: int) -> None:
    def masks(num_workers: int) -> list[tuple[list[int], list[int]]]:
        loader = torch.utils.data.DataLoader(PreparedSlides(4), batch_size=None, num_workers=num_workers)
        return [(s["visible"].tolist(), s["target"].tolist()) for s in loader]

    assert masks(workers) == masks(0)


def test_a_slide_with_one_region_cannot_be_masked() -> None:
    assert LatentMIMObjective.min_regions == 2
    with pytest.raises(ValueError, match="at least 2 regions"):
        split_regions(1, mask_ratio=0.75, generator=None)


# ------------------------------------------------------------------ loss
def slow_patch_discrimination(pred: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """The formula written out token by token (DESIGN.md §9's sign)."""
    T, C = pred.shape
    mean = [sum(pred[k, c] for k in range(T)) / T for c in range(C)]
    std = [torch.sqrt(sum((pred[k, c] - mean[c]) ** 2 for k in range(T)) / T) for c in range(C)]
    z_hat = [torch.stack([(pred[k, c] - mean[c]) / (std[c] + 1e-4) for c in range(C)]) for k in range(T)]

    def cos(a, b):
        return (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()))

    total = 0.0
    for k in range(T):
        logits = torch.stack([cos(z_hat[k], target[l]) / tau for l in range(T)])
        total = total + (-(logits[k] - torch.logsumexp(logits, dim=0)))
    return 2 * tau * total / T


def test_loss_matches_the_slow_formula_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    pred = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 5, dtype=torch.float64)
    fast = patch_discrimination_loss(pred, target, tau=0.2)
    (grad_fast,) = torch.autograd.grad(fast, pred)
    pred64 = pred.detach().clone().requires_grad_(True)
    slow = slow_patch_discrimination(pred64, target, 0.2)
    (grad_slow,) = torch.autograd.grad(slow, pred64)
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-5)
    assert torch.allclose(grad_fast.double(), grad_slow, rtol=1e-4, atol=1e-6)


def test_a_perfect_predictor_scores_lower_than_a_random_one() -> None:
    torch.manual_seed(0)
    target = torch.randn(64, 24)
    perfect = patch_discrimination_loss(target.clone(), target, tau=0.2)
    random = patch_discrimination_loss(torch.randn(64, 24), target, tau=0.2)
    assert float(perfect) < 0.5 * float(random)
    assert float(random) == pytest.approx(2 * 0.2 * math.log(64), rel=0.15)  # chance level: 2τ·log T
    one = patch_discrimination_loss(torch.randn(1, 24), torch.randn(1, 24), tau=0.2)
    assert float(one) == 0.0  # a single target token: nothing to discriminate, and no NaN


def test_positional_penalty_is_zero_for_orthogonal_outputs_and_counts_alignment() -> None:
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(positional_penalty(torch.tensor([[0.0, 2.0], [3.0, 0.0]]), pos, margin=0.0)) == 0.0
    assert float(positional_penalty(pos * 5, pos, margin=0.0)) == pytest.approx(1.0)
    assert float(positional_penalty(pos * 5, pos, margin=0.5)) == pytest.approx(0.5)


# ------------------------------------------------------------------ predictor
def test_predictor_shapes_and_initial_queries() -> None:
    predictor = LatentMIMPredictor(SMALL_PREDICTOR, embed_dim=24)
    assert torch.equal(predictor.mask_token, torch.zeros(32)) and predictor.cls_token.abs().sum() > 0
    out = predictor(torch.randn(10, 24), torch.rand(10, 2) * 8, torch.rand(6, 2) * 8,
                    torch.tensor([False] * 5 + [True]))
    assert out.predictions.shape == (6, 24) and out.hidden.shape == (6, 32) and out.query_pos.shape == (6, 32)
    cls_only = LatentMIMPredictor(SMALL_PREDICTOR, embed_dim=24, spatial_queries=False)
    assert cls_only.mask_token is None
    with pytest.raises(ValueError, match="CLS queries only"):
        cls_only(torch.randn(3, 24), torch.rand(3, 2), torch.rand(2, 2), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="divisible by heads"):
        PredictorConfig(width=32, heads=5)


def test_visible_pos_weight_scales_the_keys_positional_embedding() -> None:
    torch.manual_seed(0)
    full = LatentMIMPredictor(SMALL_PREDICTOR, embed_dim=24)
    zero = LatentMIMPredictor(PredictorConfig(width=32, depth=2, heads=4, mlp_ratio=2.0, visible_pos_weight=0.0),
                              embed_dim=24)
    zero.load_state_dict(full.state_dict())
    visible, qpos, is_cls = torch.randn(6, 24), torch.rand(4, 2) * 8, torch.zeros(4, dtype=torch.bool)
    moved = torch.rand(6, 2) * 8
    # without positions on the keys, moving the visible tokens changes nothing; with them it does
    assert torch.allclose(zero(visible, torch.zeros(6, 2), qpos, is_cls).predictions,
                          zero(visible, moved, qpos, is_cls).predictions, atol=1e-6)
    assert not torch.allclose(full(visible, torch.zeros(6, 2), qpos, is_cls).predictions,
                              full(visible, moved, qpos, is_cls).predictions, atol=1e-4)


# ------------------------------------------------------------------ objective
class Recorder:
    """Forward hooks that record what each encoder was given and returned."""

    def __init__(self, objective: LatentMIMObjective) -> None:
        self.calls: dict[str, list] = {"student": [], "teacher": []}
        for name, module in (("student", objective.encoder), ("teacher", objective.teacher)):
            module.register_forward_hook(self._hook(name), with_kwargs=True)

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            self.calls[name].append((args[0].clone(), dict(kwargs), module.training, output))

        return hook


def test_student_sees_visible_regions_and_the_frozen_teacher_the_targets() -> None:
    objective = small_objective().train()
    recorder = Recorder(objective)
    sample = objective.sample_preparer()(grid_sample(8), torch.Generator().manual_seed(0))
    out = objective(sample, step_ctx=step_ctx())
    out["loss"].backward()
    (s_in, s_kwargs, s_training, _), = recorder.calls["student"]
    (t_in, t_kwargs, t_training, _), = recorder.calls["teacher"]
    assert torch.equal(s_in, sample["regions"][sample["visible"]]) and s_training
    assert torch.equal(t_in, sample["regions"][sample["target"]]) and not t_training  # alternating split
    assert s_kwargs["generator"] is not None
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    assert all(p.grad is not None for p in objective.encoder.parameters())
    assert all(p.grad is not None for p in objective.predictor.parameters())
    assert {"visible_cos", "target_cos", "pred_cos"} <= set(out) and math.isfinite(float(out["loss"].detach()))
    assert all(-1.0 <= out[k] <= 1.0 for k in ("visible_cos", "target_cos", "pred_cos"))


def test_cls_modes_and_region_fusion_switch() -> None:
    sample = RegionMasking(mask_ratio=0.5)(grid_sample(8), torch.Generator().manual_seed(0))
    losses = {}
    for mode in ("exclude", "include", "only"):
        objective = small_objective(cls_loss=mode)
        losses[mode] = float(objective(sample, step_ctx=step_ctx())["loss"].detach())
        assert (objective.predictor.mask_token is None) == (mode == "only")
    assert len({round(v, 6) for v in losses.values()}) == 3

    objective = small_objective(region_fusion=False)
    recorder = Recorder(objective)
    objective(sample, step_ctx=step_ctx())
    student_out = recorder.calls["student"][0][3]
    teacher_out = recorder.calls["teacher"][0][3]
    assert student_out.region_ids.tolist() == [0, 1, 2, 3] and teacher_out.region_ids.tolist() == [0, 1, 2, 3]
    fused = small_objective()
    recorder = Recorder(fused)
    fused(sample, step_ctx=step_ctx())
    assert recorder.calls["teacher"][0][3].region_ids.numel() < 4  # the tiny model fuses fast


def test_positional_penalty_adds_to_the_loss() -> None:
    sample = RegionMasking()(grid_sample(8), torch.Generator().manual_seed(0))
    plain = small_objective()(sample, step_ctx=step_ctx())
    penalised = small_objective(pos_penalty=0.5)(sample, step_ctx=step_ctx())
    assert "pos_penalty" not in plain and penalised["pos_penalty"] > 0
    expected = float(plain["loss"].detach()) + 0.5 * penalised["pos_penalty"]
    assert float(penalised["loss"].detach()) == pytest.approx(expected, rel=1e-5)


def test_a_sample_without_masks_is_refused_with_a_clear_message() -> None:
    with pytest.raises(KeyError, match="sample_preparer"):
        small_objective()(grid_sample(4), step_ctx=step_ctx())
    with pytest.raises(ValueError, match="num_classes=0"):
        LatentMIMObjective(build_model("pixel_mamba_tiny", region_size=16, num_classes=2), config=LatentMIMConfig())


def test_contract_schedule_teacher_export_and_registry() -> None:
    objective = small_objective()
    assert objective.requires_labels is False and objective.export_source == "teacher"
    assert objective.exported_encoder() is objective.teacher
    assert objective.ema_pairs() == [(objective.teacher, objective.encoder)]
    momentum = objective.schedules(TrainingPlan(total_steps=100, steps_per_epoch=10, epochs=10))["ema_momentum"]
    assert momentum(0) == pytest.approx(0.99) and momentum(50) == pytest.approx(0.995) and momentum(100) == 1.0
    objective.train()
    assert not objective.teacher.training and objective.encoder.training

    spec = OBJECTIVES["latentmim"]()
    assert spec.name == "latentmim" and spec.config_cls is LatentMIMConfig and not spec.needs_head
    config = section({"latentmim": {"mask_ratio": 0.6, "predictor": {"width": 32, "heads": 4}}}, "latentmim",
                     spec.config_cls)
    assert config.predictor == PredictorConfig(width=32, heads=4)
    built = spec.build(build_model("pixel_mamba_tiny", region_size=16), config, BuildContext())
    assert isinstance(built, LatentMIMObjective) and built.sample_preparer() == RegionMasking(mask_ratio=0.6)


def test_collapse_monitor_fires_once_per_episode() -> None:
    monitor = CollapseMonitor(threshold=0.9, window=3, name="pred")
    fired = [monitor.update(v, step=i) for i, v in enumerate([0.95, 0.97, 0.5, 0.95, 0.96, 0.99, 0.99, 0.3, 0.95,
                                                              0.95, 0.95])]
    assert [i for i, m in enumerate(fired) if m] == [5, 10]
    assert "step 5" in fired[5] and "0.9" in fired[5]
    assert all(m is None for m in (CollapseMonitor(threshold=0.0, window=0, name="x").update(1.0, step=0),))


def test_collapse_warning_reaches_drain_messages_after_optimizer_steps() -> None:
    objective = small_objective(collapse_threshold=-1.0, collapse_window=2).train()
    reduced = []

    def all_reduce_sum(t):
        reduced.append(t.clone())
        return t

    plan = TrainingPlan(total_steps=4, steps_per_epoch=2, epochs=2)
    sample = RegionMasking()(grid_sample(12), torch.Generator().manual_seed(0))
    for step in range(3):
        objective(sample, step_ctx=step_ctx(step))
        objective.on_after_step(HookContext(step=step, epoch=0, plan=plan, all_reduce_sum=all_reduce_sum))
        messages = objective.drain_messages()
        assert len(messages) == (1 if step == 1 else 0)
    assert float(reduced[0][1]) == 1.0  # (sum, count) of one micro-step went through the all-reduce
    assert objective.drain_messages() == []


def test_collapse_monitor_window_survives_a_checkpoint() -> None:
    """A resumed run fires where the uninterrupted one does: the window travels in the objective state."""
    objective = small_objective(collapse_threshold=-1.0, collapse_window=3).train()
    plan = TrainingPlan(total_steps=4, steps_per_epoch=2, epochs=2)
    sample = RegionMasking()(grid_sample(12), torch.Generator().manual_seed(0))
    for step in range(2):
        objective(sample, step_ctx=step_ctx(step))
        objective.on_after_step(HookContext(step=step, epoch=0, plan=plan))
    assert objective.drain_messages() == []
    state = torch.load(_roundtrip(objective.objective_state_dict()), weights_only=True)
    assert state["monitor.recent"].shape == (2,) and not bool(state["monitor.fired"])

    resumed = small_objective(collapse_threshold=-1.0, collapse_window=3).train()
    resumed.load_objective_state_dict(state)
    resumed(sample, step_ctx=step_ctx(2))
    resumed.on_after_step(HookContext(step=2, epoch=0, plan=plan))
    assert any("collapse warning at step 2" in m for m in resumed.drain_messages())

    older = {k: v for k, v in state.items() if not k.startswith("monitor.")}  # a checkpoint from before
    fresh = small_objective(collapse_threshold=-1.0, collapse_window=3)
    fresh.load_objective_state_dict(older)
    assert len(fresh._monitor.recent) == 0


def _roundtrip(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_validation_loss_is_deterministic_and_metrics_are_complete() -> None:
    objective = small_objective().eval()
    samples = [grid_sample(6, seed=s) for s in range(3)]
    with torch.no_grad():
        records = [objective.validation_step(s, device=torch.device("cpu")) for s in samples]
        again = objective.validation_step(samples[0], device=torch.device("cpu"))
    assert records[0]["loss"] == again["loss"] and math.isfinite(again["loss"])
    assert len(records[0]["embedding"]) == objective.encoder.embed_dim
    metrics = objective.validation_metrics(records)
    assert set(metrics) == {"loss", "slide_rankme", "slide_cos", "region_rankme", "region_cos", "token_rankme",
                            "token_cos"}
    assert 1.0 <= metrics["slide_rankme"] <= 3.0 and -1.0 <= metrics["slide_cos"] <= 1.0
    names = objective.validation_metric_names()  # a mistyped --best-metric is refused at start-up
    assert set(metrics) <= names and "knn_balanced_accuracy" in names and "rankme" not in names
    assert metrics["loss"] == pytest.approx(np.mean([r["loss"] for r in records]))


# ------------------------------------------------------------------ recipes
@pytest.mark.parametrize("recipe", ["latentmim_panda10x.toml", "latentmim_demo_cpu.toml"])
def test_recipes_build_every_table(recipe: str) -> None:
    with open(REPO / "configs" / recipe, "rb") as handle:
        data = tomllib.load(handle)
    assert data["objective"] == "latentmim"
    config = section(data, "latentmim", LatentMIMConfig)
    section(data, "optim", OptimConfig)
    section(data, "loop", LoopConfig)
    # `precrop_regions` (the data layer's region cap) comes with the engine's SSL DataConfig
    assert set(data["data"]) <= {f.name for f in fields(DataConfig)} | {"precrop_regions"}
    assert data["data"]["min_regions"] >= LatentMIMObjective.min_regions
    model = dict(data["model"])
    encoder = build_model(model.pop("name"), **model)
    LatentMIMObjective(encoder, config=config)


# ------------------------------------------------------------------ a tiny training run


def tiny_run(store: Path, out_dir: Path, **loop) -> tuple[Trainer, object]:
    torch.manual_seed(0)
    train = TileStoreDataset(store, split="train", min_regions=LatentMIMObjective.min_regions)
    encoder = build_model("pixel_mamba_tiny", region_size=train.region_size)
    objective = LatentMIMObjective(
        encoder, config=LatentMIMConfig(predictor=PredictorConfig(width=32, depth=1, heads=4, mlp_ratio=2.0),
                                        ema_momentum=0.9),
    )
    settings = dict(epochs=4, accum_steps=2, tensorboard=False, progress=False, seed=0, clip_grad=3.0) | loop
    trainer = Trainer(
        objective,
        train=SlideFeed(train, seed=0),  # the engine hands it the preparer and runs the EMA
        val=None,
        optim_config=OptimConfig(lr=3e-3, min_lr=1e-3, warmup_steps=1, weight_decay=0.05, betas=(0.9, 0.95)),
        loop_config=LoopConfig(**settings),
        out_dir=out_dir,
        device=torch.device("cpu"),
    )
    return trainer, objective


@pytest.fixture(scope="module")
def small_unlabelled_store(tmp_path_factory: pytest.TempPathFactory, real_slide_path: Path) -> Path:
    """4 unlabelled training slides of 4–7 real-tissue regions, 16 px (a quarter of the tiny model's 32-px cost)."""
    return write_stain_store(tmp_path_factory.mktemp("lm") / "lm.zarr", real_slide_path, per_class={"train": 2},
                             labelled=False, size=16)


def test_tiny_run_trains_and_resumes_exactly(small_unlabelled_store, tmp_path) -> None:
    store = small_unlabelled_store
    trainer, objective = tiny_run(store, tmp_path / "full")
    teacher_before = [p.clone() for p in objective.teacher.parameters()]
    full = trainer.fit()
    losses = [row["loss"] for row in full.history]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert all(math.isfinite(row[k]) for row in full.history for k in ("pred_cos", "target_cos"))
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, objective.teacher.parameters()))
    payload = load_checkpoint(full.last_checkpoint)
    assert any(k.startswith("teacher.") for k in payload["objective"])
    assert any(k.startswith("predictor.") for k in payload["objective"])
    assert all(torch.isfinite(v).all() for v in payload["objective"].values() if v.is_floating_point())

    cut, _ = tiny_run(store, tmp_path / "cut", max_steps=3)  # stops mid-epoch 1
    first = cut.fit()
    resumed_trainer, _ = tiny_run(store, tmp_path / "cut")
    torch.manual_seed(123)
    resumed = resumed_trainer.fit(resume=load_checkpoint(first.last_checkpoint))
    assert [r["loss"] for r in first.history + resumed.history] == pytest.approx(losses, abs=1e-6, rel=0)
    end_full = load_checkpoint(full.last_checkpoint)["objective"]
    end_resumed = load_checkpoint(resumed.last_checkpoint)["objective"]
    assert all(torch.allclose(end_full[k], end_resumed[k], atol=1e-6) for k in end_full)
