"""Multi-process training set-up, compatible with `torchrun`.

`torchrun --nproc_per_node N -m clipcount train ...` sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/MASTER_PORT in each process; `init_from_env` joins the process group (gloo on CPU,
nccl on CUDA) and says which device this process uses. Without those variables (or with
WORLD_SIZE=1) training runs in one process and nothing here touches torch.distributed.

Only rank 0 writes checkpoints and logs; the others wait at a barrier so nobody reads a checkpoint
before it is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from clipcount.errors import ConfigError


@dataclass
class DistContext:
    """Where this process stands among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_context() -> DistContext:
    """The context torchrun's environment variables describe (single process when they are absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}; start the processes with torchrun")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def default_backend(device: torch.device | None = None) -> str:
    if device is not None:
        return "nccl" if device.type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None) -> DistContext:
    """Join the process group torchrun set up (idempotent); a single-process context otherwise."""
    ctx = env_context()
    if not ctx.enabled:
        return ctx
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), ctx.local_rank, dist.get_backend())
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
    ctx.backend = backend
    return ctx


def current_context() -> DistContext:
    """The context of an already initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(),
                           int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_backend())
    return DistContext()


def device_for(ctx: DistContext, requested: str | torch.device | None = None) -> torch.device:
    """The device this process trains on: the requested one, else its local GPU, else the CPU."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
        return device
    if torch.cuda.is_available() and ctx.backend != "gloo":
        return torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
    return torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def mean_across(ctx: DistContext, value: float, device: torch.device) -> float:
    """The mean of a number over all processes (for logging); every process must call it."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world_size


def rank0_decides(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every process (e.g. a clock-based stop, which must agree); every process must call it."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (pickled in transit only, never written to disk)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (only one this module created from the environment)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
