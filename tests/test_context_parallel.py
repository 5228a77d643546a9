"""Context parallelism on 2 CPU ranks (gloo, real torch.distributed): the summed shares of the loss, the summed
gradients and the all-reduced scan statistics equal one rank holding the whole sequence."""
from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mamba.context_parallel import context_parallel_groups, context_parallel_loss, piece_bounds
from adaptive_mamba.pillars import ScanStatsCollector
from adaptive_mamba.training.distributed import free_port
from test_chunked import batch, pillared_model


def _worker(rank: int, world: int, port: int, length: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group, dp_rank, dp_size = context_parallel_groups(world)
        assert (dp_rank, dp_size) == (0, 1)
        model = pillared_model()
        ids, labels = batch(length)

        def step(fn):
            model.zero_grad(set_to_none=True)
            stats = ScanStatsCollector(model)
            stats.enable()
            torch.manual_seed(123)                  # the same mask noise on every rank of the group
            loss = fn()
            loss.backward()
            stats.disable()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, stats.state_tensors()

        ref_loss, ref_grads, ref_stats = step(lambda: model(ids, labels=labels).loss)
        loss, grads, stats = step(lambda: context_parallel_loss(model, ids, labels, group))
        dist.all_reduce(loss, group=group)
        for g in list(grads.values()) + stats:
            dist.all_reduce(g, group=group)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name, g in ref_grads.items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
        for a, b in zip(stats, ref_stats):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        del model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("length", [41])   # pieces of 21 and 20 tokens
def test_two_ranks_equal_one_rank_holding_the_whole_sequence(length: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, free_port(), length), nprocs=2, join=True)


def test_piece_bounds_cover_the_sequence_contiguously() -> None:
    assert piece_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert piece_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
