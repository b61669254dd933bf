"""Data parallelism on CPU: two gloo processes keep identical weights, average each metric over its own
count, and an error on one rank ends both with one message."""

from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp
from engine_data import ColourSlides, ParamObjective

from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.distributed import DistEnv, init_distributed, shutdown_distributed
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, RankFailure, Trainer
from trainer.engine.optim import OptimConfig
from trainer.models import build_model
from trainer.objectives.supervised import SupervisedConfig, SupervisedObjective


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed(torch.device("cpu"), DistEnv(rank=rank, local_rank=rank, world_size=world_size))
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
        objective = SupervisedObjective(model, label_map={"a": 0, "b": 1}, config=SupervisedConfig())
        trainer = Trainer(
            objective,
            train=SlideFeed(ColourSlides(8, regions=2), env=env, seed=0),
            val=SlideFeed(ColourSlides(3, regions=2, offset=100), env=env, shuffle=False),
            optim_config=OptimConfig(lr=2e-3, weight_decay=0.05),
            loop_config=LoopConfig(epochs=1, accum_steps=2, tensorboard=False, progress=False),
            out_dir=out_dir,
            device=torch.device("cpu"),
            env=env,
        )
        result = trainer.fit()
        torch.save(
            {
                "model": model.state_dict(),
                "seen": trainer.train_source.indices(0).tolist(),
                "losses": [row["loss"] for row in result.history],
                "val": result.validations,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        shutdown_distributed()


def test_two_gloo_ranks_stay_identical(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert sorted(r0["seen"] + r1["seen"]) == list(range(8))  # disjoint shards of one epoch
    assert len(r0["losses"]) == 2 and r0["losses"] == r1["losses"]  # losses are averaged over ranks
    for key, value in r0["model"].items():
        assert torch.equal(value, r1["model"][key]), key
    assert r0["val"] == r1["val"] and r0["val"][0]["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)  # 3 slides, no duplicates
    payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["world_size"] == 2 and payload["step"] == 2
    assert all(torch.equal(payload["model"][k], v) for k, v in r0["model"].items())


class RankObjective(ParamObjective):
    """Rank-dependent metrics; raises on rank 1 at optimizer step `fail_at`."""

    def __init__(self, rank: int, fail_at: int | None) -> None:
        super().__init__()
        self.rank, self.fail_at = rank, fail_at

    def forward(self, sample, *, step_ctx):
        if self.rank == 1 and step_ctx.step == self.fail_at:
            raise ValueError("boom on purpose")
        out = super().forward(sample, step_ctx=step_ctx)
        out["common"] = torch.tensor(float(self.rank))
        if self.rank == 1:
            out["only_rank1"] = torch.tensor(5.0)
        if step_ctx.micro_step == 0:
            out["first_micro"] = torch.tensor(float(10 * self.rank))
        return out


def _metrics_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed(torch.device("cpu"), DistEnv(rank=rank, local_rank=rank, world_size=world_size))
    try:
        torch.manual_seed(rank)
        objective = RankObjective(rank, fail_at=1)
        trainer = Trainer(
            objective, train=SlideFeed(ColourSlides(8, size=4), env=env, seed=0), val=None,
            optim_config=OptimConfig(lr=1e-2, weight_decay=0.0),
            loop_config=LoopConfig(epochs=1, accum_steps=2, tensorboard=False, progress=False),
            out_dir=out_dir, device=torch.device("cpu"), env=env,
        )
        rows = []
        original = trainer._optimizer_step

        def record(source):
            row, stop = original(source)
            rows.append(row)
            return row, stop

        trainer._optimizer_step = record
        error = None
        try:
            trainer.fit()
        except RankFailure as exc:
            error = (str(exc), exc.rank, exc.local)
        torch.save({"rows": rows, "error": error, "weight": objective.encoder.weight.detach()},
                   f"{out_dir}/metrics{rank}.pt")
    finally:
        shutdown_distributed()


def test_metrics_use_their_own_counts_and_an_error_on_one_rank_ends_both(tmp_path) -> None:
    mp.spawn(_metrics_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "metrics0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "metrics1.pt", weights_only=True)
    assert len(r0["rows"]) == len(r1["rows"]) == 1  # step 0 done; step 1 failed on rank 1
    row = r0["rows"][0]
    timing = {"samples_per_s"}
    assert {k: v for k, v in row.items() if k not in timing} == {
        k: v for k, v in r1["rows"][0].items() if k not in timing}
    assert row["common"] == 0.5  # 2 samples of rank 0 (0.0) and 2 of rank 1 (1.0)
    assert row["only_rank1"] == 5.0  # averaged over rank 1's 2 samples only, not over 4
    assert row["first_micro"] == 5.0  # one sample per rank reported it
    assert r0["error"] == ("rank 1 of 2: ValueError: boom on purpose", 1, False)
    assert r1["error"] == ("rank 1 of 2: ValueError: boom on purpose", 1, True)
    assert torch.equal(r0["weight"], r1["weight"])
