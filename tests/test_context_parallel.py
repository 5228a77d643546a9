"""Context parallelism on 2 CPU ranks (gloo, real torch.distributed): the summed shares of the loss, the summed
gradients and the all-reduced scan statistics equal one rank holding the whole sequence."""
from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mamba.context_parallel import context_parallel_loss, piece_bounds
from adaptive_mamba.training.distributed import context_parallel_groups
from adaptive_mamba.pillars import ScanStatsCollector
from adaptive_mamba.training.distributed import free_port
from test_chunked import batch, pillared_model
from test_train_runs import data_dir  # noqa: F401  (fixture: real shards)


# (masks, activation checkpointing of the pieces): each compared with one rank holding the whole sequence
VARIANTS = [("structured", False), ("channel", True)]


def _worker(rank: int, world: int, port: int, length: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group, dp_rank, dp_size = context_parallel_groups(world)
        assert (dp_rank, dp_size) == (0, 1)
        ids, labels = batch(length)
        for masks, checkpointing in VARIANTS:
            model = pillared_model(masks=masks)

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
            model.config.gradient_checkpointing = checkpointing
            loss, grads, stats = step(lambda: context_parallel_loss(model, ids, labels, group))
            dist.all_reduce(loss, group=group)
            for g in list(grads.values()) + stats:
                dist.all_reduce(g, group=group)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            for name, g in ref_grads.items():
                assert g.abs().max() > 0, name
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(),
                                           msg=f"{masks}: {name}")
            for a, b in zip(stats, ref_stats):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
            del model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("length", [41])   # pieces of 21 and 20 tokens
def test_two_ranks_equal_one_rank_holding_the_whole_sequence(length: int) -> None:
    """Structured masks without checkpointing; channel masks with the pieces' blocks checkpointed (recomputed in
    backward, exchanges included); the scan statistics all-reduced over the group equal one rank's."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, free_port(), length), nprocs=2, join=True)


def test_piece_bounds_cover_the_sequence_contiguously() -> None:
    assert piece_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert piece_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.slow
def test_training_runs_chunked_and_context_parallel_match_one_pass(tmp_path, data_dir) -> None:
    """Real runs through launch/train.py (DeepSpeed ZeRO-2, all pillars, a scan-order refresh): chunks on one rank
    and a context-parallel group of 2 ranks give the losses and gradient norms of one pass on one rank."""
    from test_train_runs import TINY, metrics, train

    common = [f"data.dir={data_dir}", "train.zero_stage=2", "train.max_steps=3",
              "scan_order.every=2", *TINY]
    runs = {"plain": (1, []), "chunked": (1, ["train.chunk_len=40"]), "cp": (2, ["train.context_parallel=2"])}
    logs = {}
    for name, (nproc, extra) in runs.items():
        logs[name] = train(nproc, [f"train.output_dir={tmp_path / name}", *common, *extra]).stdout
        assert "scan order refreshed at step 2" in logs[name]
    assert "in chunks of 40" in logs["chunked"] and "split over 2 context-parallel ranks" in logs["cp"]
    ref = metrics(tmp_path / "plain")
    for name in ("chunked", "cp"):
        got = metrics(tmp_path / name)
        assert sorted(got) == [1, 2, 3]
        for step, row in ref.items():
            assert abs(got[step]["loss"] - row["loss"]) < 1e-5 * max(1.0, abs(row["loss"])), (name, step)
            assert abs(got[step]["grad_norm"] - row["grad_norm"]) < 1e-4 * max(1.0, row["grad_norm"]), (name, step)


def test_document_mode_hands_out_each_whole_document_once(data_dir) -> None:
    from adaptive_mamba.data import TokenShards, WindowSampler

    shards = TokenShards(data_dir, "train")
    longest = int(shards.doc_lengths.max()) + 1
    sampler = WindowSampler(shards, longest, batch_size=1, mode="document", seed=3)
    seen = []
    for step in range(sampler.steps_per_epoch(0)):
        ids = sampler.batch_at(step, 0)["input_ids"][0]
        doc = int(sampler.layout(0).doc_order[sampler.window_ids_at(step, 0)[0]])
        assert len(ids) == int(shards.doc_lengths[doc]) + 1 and int(ids[-1]) == shards.eos_id   # unpadded, EOS
        assert ids[:-1].tolist() == shards.doc(doc, 0, len(ids) - 1).tolist()
        seen.append(doc)
    assert sorted(seen) == list(range(len(shards)))
