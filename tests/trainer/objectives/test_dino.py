"""DINO: head, loss, centre, schedules, hooks, monitors, validation, and a tiny run with exact resume."""

from __future__ import annotations

import math
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from trainer.data.tile_dataset import TileStoreDataset
from trainer.data.views import MultiCropPreparer, ViewConfig
from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, Trainer
from trainer.engine.optim import OptimConfig
from trainer.models import build_model
from trainer.objectives import OBJECTIVES, BuildContext
from trainer.objectives.base import HookContext, StepContext, TrainingPlan
from trainer.objectives.dino import DinoConfig, DinoHead, DinoObjective, dino_loss, supports_segments

REGION = 8
SMALL_HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, real_slide_path):
    """Unlabelled store of 8-px regions (4–7 per slide) cut from the real slide: 4 training slides."""
    from tests.trainer.conftest import write_stain_store

    return write_stain_store(
        tmp_path_factory.mktemp("dino") / "tiny.zarr", real_slide_path, per_class={"train": 2}, size=8, labelled=False
    )


def make_objective(seed: int = 0, fusion: bool = True, **overrides) -> DinoObjective:
    torch.manual_seed(seed)
    views = overrides.pop("views", {"local_views": 2})
    encoder = build_model("pixel_mamba_tiny", region_size=REGION, ssm_backend="torch", region_fusion=fusion)
    return DinoObjective(encoder, config=DinoConfig(**(SMALL_HEAD | overrides), views=views))


def make_sample(seed: int = 0, rows: int = 3, cols: int = 3, index: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return {
        "regions": torch.randint(0, 256, (n, REGION, REGION, 3), generator=g, dtype=torch.uint8),
        "coords": coords,
        "label": torch.tensor(-1),
        "slide_id": f"s{seed}",
        "index": index,
    }


def step_ctx(step: int = 0, epoch: int = 0, seed: int = 1, temp: float = 0.04) -> StepContext:
    return StepContext(
        step=step, epoch=epoch, position=0, micro_step=0, accum_steps=1, device=torch.device("cpu"),
        values={"teacher_temp": temp, "ema_momentum": 0.996}, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def hook_ctx(step: int = 0, epoch: int = 0, skipped: bool = False, **kw) -> HookContext:
    return HookContext(step=step, epoch=epoch, plan=TrainingPlan(total_steps=10, steps_per_epoch=5, epochs=2),
                       skipped=skipped, **kw)  # fmt: skip


def prepared(objective: DinoObjective, sample: dict, seed: int = 0) -> dict:
    return objective.sample_preparer()(sample, torch.Generator().manual_seed(seed))


def test_head_shapes_and_fixed_norm_last_layer():
    head = DinoHead(24, out_dim=100, hidden_dim=40, bottleneck_dim=8, layers=3)
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 100)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 40), (40, 40), (40, 8)]
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.all(magnitude == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(100), atol=1e-5)


def direct_dino_loss(student, teacher, centre, student_temp, teacher_temp):
    """DINO's loss written out term by term with exp / log (float64)."""
    s, t, c = (np.asarray(x, dtype=np.float64) for x in (student, teacher, centre))
    terms = []
    for i in range(len(t)):
        q = np.exp((t[i] - c) / teacher_temp)
        q /= q.sum()
        for j in range(len(s)):
            if i == j:
                continue
            z = s[j] / student_temp
            log_p = z - np.log(np.exp(z - z.max()).sum()) - z.max()
            terms.append(-(q * log_p).sum())
    return float(np.mean(terms))


def test_loss_matches_a_direct_implementation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 30, generator=g), torch.randn(2, 30, generator=g)
    centre = torch.randn(30, generator=g)
    for temp in (0.04, 0.07):
        got = dino_loss(student, teacher, centre, student_temp=0.1, teacher_temp=temp)
        assert float(got) == pytest.approx(direct_dino_loss(student, teacher, centre, 0.1, temp), rel=1e-5)


def test_forward_backward_and_centre_update():
    objective = make_objective().train()
    samples = [prepared(objective, make_sample(seed=i), seed=i) for i in range(2)]
    teachers = []
    original = objective.teacher_head.forward
    objective.teacher_head.forward = lambda x: teachers.append(original(x)) or teachers[-1]
    for sample in samples:
        out = objective(sample, step_ctx=step_ctx())
        assert out["loss"].requires_grad and math.isfinite(float(out["loss"]))
        out["loss"].backward()
    assert objective.head.mlp[0].weight.grad is not None and objective.encoder.cls_token.grad is not None
    assert all(p.grad is None for p in objective.teacher_encoder.parameters())
    assert torch.equal(objective.centre, torch.zeros(64))  # only the hook moves it
    objective.on_after_step(hook_ctx(skipped=True))
    assert torch.equal(objective.centre, torch.zeros(64))  # a skipped step leaves it alone
    for sample in samples:
        objective(sample, step_ctx=step_ctx())
    teachers = teachers[2:]
    objective.on_after_step(hook_ctx())
    expected = 0.1 * torch.cat(teachers).mean(dim=0)  # centre 0 → 0.9·0 + 0.1·mean over both slides' global views
    assert torch.allclose(objective.centre, expected, atol=1e-6)


def _centre_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        objective = make_objective().train()
        sample = prepared(objective, make_sample(seed=10 + rank), seed=rank)
        objective(sample, step_ctx=step_ctx(seed=rank))
        local_sum, local_count = objective._centre_sum.clone(), objective._centre_count

        def reduce(t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        objective.on_after_step(hook_ctx(rank=rank, world_size=world_size, all_reduce_sum=reduce))
        torch.save({"sum": local_sum, "count": local_count, "centre": objective.centre}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_centre_is_the_mean_over_both_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_centre_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    mean = (ranks[0]["sum"] + ranks[1]["sum"]) / (ranks[0]["count"] + ranks[1]["count"])
    assert ranks[0]["count"] == 2 and not torch.allclose(ranks[0]["sum"], ranks[1]["sum"])
    for r in ranks:
        assert torch.allclose(r["centre"], 0.1 * mean, atol=1e-6)


def test_teacher_temperature_and_ema_schedules():
    objective = make_objective()
    plan = TrainingPlan(total_steps=500, steps_per_epoch=10, epochs=50)
    schedules = objective.schedules(plan)
    temp = schedules["teacher_temp"]
    assert temp(0) == pytest.approx(0.04) and temp(150) == pytest.approx(0.055)  # 15 of 30 warm-up epochs
    assert temp(300) == pytest.approx(0.07) and temp(499) == pytest.approx(0.07)
    ema = schedules["ema_momentum"]
    assert ema(0) == pytest.approx(0.996) and ema(250) == pytest.approx(0.998) and ema(500) == pytest.approx(1.0)
    short = objective.schedules(TrainingPlan(total_steps=20, steps_per_epoch=10, epochs=2))["teacher_temp"]
    assert short(10) == pytest.approx(0.055)  # a run shorter than the warm-up: still a valid schedule


def test_last_layer_frozen_in_epoch_zero_only_and_per_parameter_clipping():
    objective = make_objective(clip_grad_per_param=3.0)
    params = [p for p in objective.parameters() if p.requires_grad]
    last = objective.head.last_layer.parametrizations.weight.original1

    def fill():
        for p in params:
            p.grad = torch.full_like(p, 10.0)

    fill()
    objective.on_before_optimizer_step(hook_ctx(epoch=0))
    assert last.grad is None
    others = [p for p in params if p is not last]
    assert all(p.grad.norm() == pytest.approx(3.0, rel=1e-4) for p in others)
    fill()
    objective.on_before_optimizer_step(hook_ctx(epoch=1))
    assert last.grad is not None and last.grad.norm() == pytest.approx(3.0, rel=1e-4)


def test_contract_pieces():
    objective = make_objective()
    assert objective.requires_labels is False and objective.export_source == "teacher"
    assert objective.exported_encoder() is objective.teacher_encoder
    pairs = objective.ema_pairs()
    assert pairs == [(objective.teacher_encoder, objective.encoder), (objective.teacher_head, objective.head)]
    assert all(not p.requires_grad for teacher, _ in pairs for p in teacher.parameters())
    objective.train()
    assert objective.encoder.training and not objective.teacher_encoder.training and not objective.teacher_head.training
    assert isinstance(pickle.loads(pickle.dumps(objective.sample_preparer())), MultiCropPreparer)
    state = objective.objective_state_dict()
    assert "centre" in state and any(k.startswith("teacher_encoder.") for k in state)
    spec = OBJECTIVES["dino"]()
    assert spec.config_cls is DinoConfig and not spec.needs_head
    built = spec.build(build_model("pixel_mamba_tiny", region_size=REGION), DinoConfig(**SMALL_HEAD), BuildContext())
    assert isinstance(built, DinoObjective)
    config = DinoConfig(views={"local_views": 4, "global_scale": [0.5, 1.0]})
    assert config.views == ViewConfig(local_views=4, global_scale=(0.5, 1.0))
    with pytest.raises(ValueError, match="unknown"):
        DinoConfig(views={"locals": 4})
    with pytest.raises(ValueError, match="num_classes=0"):
        DinoObjective(build_model("pixel_mamba_tiny", region_size=REGION, num_classes=2), config=DinoConfig())
    with pytest.raises(KeyError, match="sample_preparer"):
        objective(make_sample(), step_ctx=step_ctx())


def test_monitor_window_reports_rankme_and_warns_on_collapse():
    objective = make_objective(monitor_window=2).train()
    sample = prepared(objective, make_sample())
    for step in range(2):  # the same slide twice: identical teacher embeddings (the teacher is in eval mode)
        out = objective(sample, step_ctx=step_ctx(step=step))
        assert "rankme" not in out
        objective.on_after_step(hook_ctx(step=step))
    messages = objective.drain_messages()
    assert "RankMe" in messages[0] and any("collapse" in m for m in messages)
    assert objective.drain_messages() == []
    out = objective(sample, step_ctx=step_ctx(step=2))
    assert float(out["rankme"]) == pytest.approx(1.0, abs=0.01) and float(out["mean_cosine"]) == pytest.approx(1.0)


def test_monitor_window_survives_a_checkpoint():
    """The open window and the last window's metrics travel in the objective state: a resumed run
    closes its window on the same step as the uninterrupted one, with the same RankMe."""
    straight = make_objective(monitor_window=3).train()
    samples = [prepared(straight, make_sample(seed=i)) for i in range(3)]
    for step, sample in enumerate(samples):
        straight(sample, step_ctx=step_ctx(step=step))
        straight.on_after_step(hook_ctx(step=step))
        if step == 1:
            state = {k: v.clone() for k, v in straight.objective_state_dict().items()}
    assert state["monitor.window"].shape == (2, straight.encoder.embed_dim) and state["monitor.metrics"].numel() == 0

    resumed = make_objective(monitor_window=3).train()
    resumed.load_objective_state_dict(state)
    resumed(samples[2], step_ctx=step_ctx(step=2))
    resumed.on_after_step(hook_ctx(step=2))
    assert resumed.drain_messages()[0] == straight.drain_messages()[0]  # "dino monitor (step 2, 3 slides): RankMe …"
    closed = resumed.objective_state_dict()
    assert closed["monitor.window"].shape[0] == 0 and closed["monitor.metrics"].shape == (2,)

    older = {k: v for k, v in state.items() if not k.startswith("monitor.")}  # a checkpoint from before
    fresh = make_objective(monitor_window=3)
    fresh.load_objective_state_dict(older)
    assert fresh._window == [] and fresh._window_metrics == {}


def test_validation_is_deterministic_and_reports_embedding_metrics():
    objective = make_objective().eval()
    samples = [make_sample(seed=i, index=i) for i in range(3)]
    with torch.no_grad():
        records = [objective.validation_step(s, device=torch.device("cpu")) for s in samples]
        again = objective.validation_step(samples[0], device=torch.device("cpu"))
    assert again["loss"] == records[0]["loss"] and again["embedding"] == records[0]["embedding"]
    metrics = objective.validation_metrics(records)
    assert set(metrics) == {"loss", "rankme", "mean_cosine"}
    names = objective.validation_metric_names()  # a mistyped --best-metric is refused at start-up
    assert set(metrics) <= names and "linear_balanced_accuracy" in names and "rankme_slide" not in names
    assert all(math.isfinite(v) for v in metrics.values()) and 1.0 <= metrics["rankme"] <= 3.0


def per_view_reference(objective, sample, ctx):
    """The separate path, forced."""
    objective.pack = False
    out = objective(sample, step_ctx=ctx)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion", [False, True])
def test_packed_views_equal_separate_views(fusion):
    assert supports_segments(build_model("pixel_mamba_tiny", region_size=REGION))
    separate = make_objective(fusion=fusion).train()
    packed = make_objective(fusion=fusion).train()  # the same seed: the same weights
    sample = prepared(separate, make_sample(rows=4, cols=5))
    loss_a, grads_a = per_view_reference(separate, sample, step_ctx(seed=3))
    packed.pack = True
    out = packed(sample, step_ctx=step_ctx(seed=3))
    out["loss"].backward()
    assert float(out["loss"]) == pytest.approx(float(loss_a), abs=1e-5)
    for name, grad in grads_a.items():  # norm-relative: the head's gradients reach ~1e2, float32 sums differ by order
        got = dict(packed.named_parameters())[name].grad
        assert (got - grad).norm() <= 1e-5 * grad.norm() + 1e-7, name


def make_trainer(out_dir, store, **loop) -> Trainer:
    torch.manual_seed(0)
    encoder = build_model("pixel_mamba_tiny", region_size=8, ssm_backend="torch")
    objective = DinoObjective(encoder, config=DinoConfig(**SMALL_HEAD, views={"local_views": 2}, monitor_window=2))
    dataset = TileStoreDataset(store, split="train")
    settings = dict(epochs=2, accum_steps=2, tensorboard=False, progress=False, seed=0, amp="none") | loop
    return Trainer(
        objective,
        train=SlideFeed(dataset, seed=0),  # the engine hands it the objective's preparer
        val=None,
        optim_config=OptimConfig(lr=5e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.04, weight_decay_end=0.4),
        loop_config=LoopConfig(**settings),
        out_dir=out_dir,
        device=torch.device("cpu"),
    )


def test_tiny_run_trains_and_resumes_exactly(tmp_path, tiny_store):
    full = make_trainer(tmp_path / "full", tiny_store).fit()
    losses = [row["loss"] for row in full.history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert len(set(round(v, 6) for v in losses)) > 1
    assert [round(row["teacher_temp"], 6) for row in full.history][0] == 0.04
    assert full.history[-1]["weight_decay"] > full.history[0]["weight_decay"]

    cut = make_trainer(tmp_path / "cut", tiny_store, max_steps=1).fit()
    payload = load_checkpoint(cut.last_checkpoint)
    assert payload["objective_name"] == "dino" and "centre" in payload["objective"]
    resumed = make_trainer(tmp_path / "cut", tiny_store).fit(resume=payload)
    assert [row["loss"] for row in cut.history + resumed.history] == pytest.approx(losses, abs=1e-6, rel=0)
    end_full = load_checkpoint(full.last_checkpoint)
    end_resumed = load_checkpoint(resumed.last_checkpoint)
    for key in ("model", "objective"):
        assert all(torch.allclose(end_full[key][k], end_resumed[key][k], atol=1e-6) for k in end_full[key])


@pytest.mark.parametrize("name", ["dino_panda5x", "dino_tcga2.5x", "dino_demo_cpu"])
def test_recipes_build_their_configs(name):
    from pathlib import Path

    from trainer.engine.config import load_recipe, section

    recipe = load_recipe(Path(__file__).resolve().parents[3] / "configs" / f"{name}.toml")
    assert recipe["objective"] == "dino"
    config = section(recipe, "dino", DinoConfig)
    optim = section(recipe, "optim", OptimConfig)
    loop = section(recipe, "loop", LoopConfig)
    assert config.views.global_views == 2 and optim.weight_decay == 0.04 and optim.weight_decay_end == 0.4
    assert (config.teacher_temp, config.teacher_temp_final) == (0.04, 0.07) and not loop.clip_grad
    if name != "dino_demo_cpu":
        assert (config.out_dim, config.views.local_views, loop.epochs) == (65536, 6, 200)
        assert (optim.lr, optim.min_lr) == (5e-4, 1e-6)
        assert optim.warmup_epochs == 10 and loop.accum_steps * 16 == 256 and config.teacher_temp_epochs == 30


def test_eval_regions_caps_validation_slides():
    capped = make_objective(eval_regions=4).eval()
    sample = make_sample(rows=4, cols=5)
    with torch.no_grad():
        record = capped.validation_step(sample, device=torch.device("cpu"))
        subset = {**sample, "regions": sample["regions"][[0, 6, 13, 19]], "coords": sample["coords"][[0, 6, 13, 19]]}
        direct = make_objective(eval_regions=0).eval().validation_step(subset, device=torch.device("cpu"))
    assert record["loss"] == pytest.approx(direct["loss"]) and record["embedding"] == pytest.approx(direct["embedding"])
