"""DDP plumbing: torchrun's environment → process group, wrapping, collectives.

Launch with `torchrun --nproc_per_node N -m trainer.cli supervised ...`. Without
torchrun's variables the run is a single process and every helper is a no-op.
Backend: nccl on CUDA, gloo on CPU.

Data parallelism is explicit rather than through DistributedDataParallel: rank 0's
parameters and buffers are broadcast once (`broadcast_module`), and after each
optimizer step's micro-steps the ranks first exchange a status (losses, metric
sums and counts, errors, stop requests) and only then average the gradients
(`all_reduce_gradients`). So every collective happens at a point every rank
reaches, error or not: an exception on one rank ends all ranks with one clear
line instead of leaving the others waiting inside a gradient all-reduce. Only
parameters with `requires_grad` are reduced (EMA teachers never are), and
buffers are never broadcast after the start (the equivalent of DDP's
`broadcast_buffers=False`): objective-owned buffers such as DINO's centre are
kept in step by the objective through `HookContext.all_reduce_sum`. The price is
no overlap of gradient communication with the backward pass, small for
Pixel-Mamba's few million parameters against seconds-long slide steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """This process's place in the job. world_size 1 = not distributed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as set by torchrun (defaults: single process)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_distributed(device: torch.device, env: DistEnv | None = None) -> DistEnv:
    """Join the process group when launched by torchrun; pins the CUDA device per local rank.

    Returns the environment; a single process gets `DistEnv()` and no group.
    """
    env = env or env_from_torchrun()
    if not env.enabled:
        return env
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env


def shutdown_distributed() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's parameters and buffers to every rank (once, before training)."""
    if not env.enabled:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(params: list[nn.Parameter], env: DistEnv) -> None:
    """Average `.grad` over ranks, in place. A parameter without a gradient on some ranks gets
    zeros there; one without a gradient on every rank keeps `grad = None` (AdamW skips it)."""
    if not env.enabled or not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    used = [p for p, n in zip(params, present.tolist()) if n > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in used:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(env.world_size)
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of `values` over ranks, as a new tensor on `values`' device (the input itself when single-process)."""
    if not env.enabled:
        return values
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    reduced = values.detach().to(backend_device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def all_gather_objects(value: Any, env: DistEnv) -> list[Any]:
    """Every rank's `value` (a list of length world_size); [value] when single-process."""
    if not env.enabled:
        return [value]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's `value` on every rank."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    """Wait for all ranks (no-op when single-process)."""
    if env.enabled:
        dist.barrier()
