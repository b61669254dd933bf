"""DDP plumbing: torchrun's environment → process group, wrapping, collectives.

Launch with `torchrun --nproc_per_node N -m trainer.cli supervised ...`. Without
torchrun's variables the run is a single process and every helper is a no-op.
Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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


def wrap_ddp(module: nn.Module, env: DistEnv, device: torch.device, *, find_unused: bool = False) -> nn.Module:
    """DDP-wrap `module` when distributed, else return it unchanged.

    Frozen parameters (EMA teachers) are ignored by DDP's gradient reduction.
    """
    if not env.enabled:
        return module
    device_ids = [device.index if device.index is not None else env.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def maybe_no_sync(module: nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's `no_sync()` on accumulation micro-steps (gradients all-reduced on the last one only)."""
    if skip_sync and isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a float64 tensor over ranks (returned as a new CPU tensor)."""
    if not env.enabled:
        return values
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    reduced = values.to(backend_device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


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
