"""Process groups and the collectives of the training loop: start, reduce, broadcast, barrier, shut down.

The only module that talks to torch.distributed (DeepSpeed runs its own collectives on the default group).

Two groups: the default one (nccl on GPUs, gloo on CPU) belongs to DeepSpeed; next to it a gloo side group
carries our statistics, flags and decisions as CPU tensors (the torchtitan/Megatron pattern). NCCL accepts
CUDA tensors only and our statistics are float64 CPU sums, so every helper below copies its tensors to the CPU
and uses the side group, whatever device the caller's tensors are on. The side group exists at every scale,
so the CPU tests run the same code path as the GPUs.

The launcher (deepspeed, torchrun, srun or plain python) decides the topology; `launch/train.py` reads it from
the environment into a `DistContext` and passes it here, so the library never reads environment variables. A
single process still gets a (world size 1) process group, so DeepSpeed runs the same code path at any scale.

Shutdown follows DESIGN.md: torch 2.13 with gloo aborts at exit in about 1 run of 4 unless the model and
optimizer are deleted, `gc.collect()` runs, all ranks meet at a barrier and only then the process group is
destroyed.
"""
from __future__ import annotations

import gc
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

_side_group: Optional[dist.ProcessGroup] = None     # gloo group for CPU statistics (created by init_distributed)


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
        """cuda:local_rank on a GPU machine (an error if that GPU does not exist), else the CPU."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(f"LOCAL_RANK {self.local_rank} but this node has {count} GPU(s): start at most "
                             f"{count} process(es) per node (e.g. `make train` uses one per GPU, or NPROC={count})")
        return torch.device("cuda", self.local_rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ctx: DistContext, timeout_s: float = 1800.0) -> None:
    """Create the default process group (nccl on GPU, gloo on CPU), hand it to DeepSpeed, and create the gloo
    side group for statistics."""
    global _side_group
    device = ctx.device()
    if not dist.is_initialized():
        if ctx.world_size > 1 and ctx.master_port == 0:
            raise ValueError("MASTER_PORT is required when WORLD_SIZE > 1 (set by deepspeed/torchrun/srun)")
        port = ctx.master_port or free_port()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://{ctx.master_addr}:{port}", rank=ctx.rank,
                                world_size=ctx.world_size, timeout=timedelta(seconds=timeout_s))
    if _side_group is None:
        _side_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _group() -> dist.ProcessGroup:
    if _side_group is None:
        raise RuntimeError("collective before init_distributed(): the gloo side group for statistics does not exist")
    return _side_group


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_group())


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed across ranks, returned as a new tensor on the input's device and dtype (the reduction
    runs on a CPU copy on the gloo side group, so float64 statistics work under any default backend)."""
    out = []
    for t in tensors:
        buf = t.detach().to("cpu", copy=True)
        if _multi_rank():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=_group())
        out.append(buf.to(t.device))
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (stop requests, non-finite losses)."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    if _multi_rank():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_group())
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled); used for the pillars' decisions."""
    if not _multi_rank():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not _multi_rank():
        return [obj]
    out: list[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_group())
    return out


def shutdown() -> None:
    """Collect garbage, meet at a barrier, destroy every process group. Callers drop their engine/model first."""
    global _side_group
    gc.collect()
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    _side_group = None


# --------------------------------------------------------------- context-parallel groups (compute-device tensors)
def context_parallel_groups(cp_size: int) -> tuple[Any, int, int]:
    """Create the context-parallel groups (consecutive blocks of `cp_size` ranks, on the default backend; collective:
    every rank calls it) and return (this rank's group, its data-parallel rank, the data-parallel world size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"context_parallel={cp_size} must divide the number of ranks ({world}): use a divisor of "
                         f"{world} or launch a multiple of {cp_size} ranks")
    mine = None
    for g in range(world // cp_size):
        group = dist.new_group(list(range(g * cp_size, (g + 1) * cp_size)))
        if g == rank // cp_size:
            mine = group
    return mine, rank // cp_size, world // cp_size


def group_rank_and_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_tensor(t: torch.Tensor, group: Any) -> torch.Tensor:
    """(size, *t.shape): every rank's `t` on `group` (float32 on the wire, back in t's dtype, on t's device: the
    context-parallel groups use the default backend, whose device the activations are on)."""
    send = t.detach().float().contiguous()
    out = [torch.empty_like(send) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, send, group=group)
    return torch.stack(out).to(t.dtype)
