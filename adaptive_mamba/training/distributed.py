"""Process-group helpers: start, all-reduce, broadcast decisions, and a clean shutdown.

The launcher (deepspeed, torchrun, srun or plain python) decides the topology; `launch/train.py`
reads it from the environment into a `DistContext` and passes it here, so the library never reads
environment variables. A single process still gets a (world size 1) process group, so DeepSpeed
and every collective below run the same code path at any scale.

Shutdown follows DESIGN.md: torch 2.13 with gloo aborts at exit in about 1 run of 4 unless the
model and optimizer are deleted, `gc.collect()` runs, all ranks meet at a barrier and only then
the process group is destroyed.
"""
from __future__ import annotations

import gc
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among world_size processes, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0          # 0: pick a free port (single process only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ctx: DistContext, timeout_s: float = 1800.0) -> None:
    """Create the default process group (nccl on GPU, gloo on CPU) and hand it to DeepSpeed."""
    if not dist.is_initialized():
        if ctx.world_size > 1 and ctx.master_port == 0:
            raise ValueError("MASTER_PORT is required when WORLD_SIZE > 1 (set by deepspeed/torchrun/srun)")
        port = ctx.master_port or free_port()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend, init_method=f"tcp://{ctx.master_addr}:{port}", rank=ctx.rank,
                                world_size=ctx.world_size, timeout=timedelta(seconds=timeout_s))
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor across ranks (in place on a CPU copy, so float64 statistics work under gloo)."""
    out = []
    for t in tensors:
        buf = t.detach().to("cuda" if t.is_cuda else "cpu").clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out.append(buf.to(t.device))
    return out


def all_reduce_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled); used for the pillars' decisions."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Collect garbage, meet at a barrier, destroy the process group. Callers drop their engine/model first."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
