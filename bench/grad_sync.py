"""Gradient averaging across ranks: the engine's explicit sync vs DistributedDataParallel.

Two gloo ranks on CPU each run forward + backward of pixel_mamba_6m on a few small
regions, then average gradients either inside backward (DDP, the baseline: bucketed
all-reduce overlapped with the backward pass) or after it (the engine: one status
gather, then `all_reduce_gradients`). Prints the mean step time of each, side by side.

    python bench/grad_sync.py [--steps 5] [--regions 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, steps: int, regions: int, out: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from trainer.engine.distributed import DistEnv, all_gather_objects, all_reduce_gradients, broadcast_module
    from trainer.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    env = DistEnv(rank=rank, local_rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randint(0, 255, (regions, 32, 32, 3), dtype=torch.uint8)
    results = {}
    for method in ("ddp", "explicit", "ddp", "explicit"):  # interleaved: the shared cores drift
        model = build_model("pixel_mamba_6m", num_classes=2, region_size=32)
        params = [p for p in model.parameters() if p.requires_grad]
        if method == "ddp":
            module = DistributedDataParallel(model)
        else:
            broadcast_module(model, env)
            module = model
        times = []
        for step in range(steps + 1):
            dist.barrier()
            started = time.perf_counter()
            module(x, generator=torch.Generator().manual_seed(step)).logits.sum().backward()
            if method == "explicit":
                all_gather_objects({"loss": 0.0, "error": None}, env)
                all_reduce_gradients(params, env)
            times.append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        results.setdefault(method, []).extend(times[1:])
    if rank == 0:
        out.update({k: statistics.median(v) for k, v in results.items()})
        out["params"] = sum(p.numel() for p in params)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--regions", type=int, default=4)
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), args.steps, args.regions, out), nprocs=2, join=True)
        out = dict(out)
    print(f"pixel_mamba_6m ({out['params'] / 1e6:.2f}M params), 2 gloo ranks, {args.regions} regions of 32 px, "
          f"median of {2 * args.steps} steps")
    print("| gradient averaging | step s | vs DDP |")
    print("| --- | --- | --- |")
    print(f"| DistributedDataParallel (baseline) | {out['ddp']:.3f} | 1.00× |")
    print(f"| engine: status gather + all_reduce_gradients | {out['explicit']:.3f} | {out['ddp'] / out['explicit']:.2f}× |")


if __name__ == "__main__":
    main()
