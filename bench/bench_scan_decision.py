"""Cost of pillar 1 at 130M width: the scan-order decision for 24 layers at d_inner 1536, on one process and spread
over 2 ranks (gloo, each deciding every other layer, then an all-gather), and the statistics hook's overhead on a
training step (ours, hidden 256, 4 layers, batch 2, L 2048, fwd+bwd) at several token strides, in one run.

    python bench/bench_scan_decision.py [--layers 24] [--d-inner 1536] [--ranks 1 2] [--strides 1 8] [--rounds 3]

The layers' statistics come from synthetic activations whose channels are driven by shared latent factors
(structured correlations, shuffled), 3 distinct layers repeated. Times are wall and process CPU time (the machine
may be shared; CPU time is the steadier of the two); with 2 ranks, wall is from a barrier to the last rank's
result and CPU is the larger of the two ranks'.
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.pillars.scan_order import ScanStatsCollector, decide_scan_order
from adaptive_mamba.training.distributed import free_port


def layer_stats(d: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((tokens, d // 16)).astype(np.float32)
    x = np.repeat(factors, 16, axis=1) + rng.standard_normal((tokens, d), dtype=np.float32)
    x = torch.from_numpy(x[:, rng.permutation(d)]).double()
    return x.sum(0), x.T @ x, torch.tensor(float(tokens), dtype=torch.float64)


def all_stats(layers: int, d: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    distinct = [layer_stats(d, 2048, seed) for seed in range(3)]
    return [distinct[i % 3] for i in range(layers)]


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def rank_decision(rank: int, world: int, port: int, layers: int, d: int, results) -> None:
    """One rank of the spread decision: its share of the layers, then the all-gather (gloo)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stats = all_stats(layers, d)

    def exchange(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    box = {}
    dist.barrier()
    wall, cpu = timed(lambda: box.update(d=decide_scan_order(stats, rank=rank, world_size=world, exchange=exchange)))
    results.put((rank, wall, cpu, box["d"].to_dict()))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def spread_decision(world: int, layers: int, d: int) -> tuple[float, float, dict]:
    """(wall, max CPU, rank 0's decision) of the decision spread over `world` processes."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=rank_decision, args=(r, world, port, layers, d, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = sorted(results.get() for _ in range(world))
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    if any(row[3] != rows[0][3] for row in rows):
        raise RuntimeError("the ranks returned different decisions")
    return max(r[1] for r in rows), max(r[2] for r in rows), rows[0][3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-inner", type=int, default=1536)
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 8], help="token strides of the hook")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="processes sharing the decision")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the hook timing (best of)")
    args = parser.parse_args()

    box = {}
    stats = all_stats(args.layers, args.d_inner)
    times = {1: timed(lambda: box.update(d=decide_scan_order(stats)))}
    single = box["d"]
    gain = np.mean([1 - a / i for a, i in zip(single.cost_after, single.cost_identity)])
    print(f"decision: {args.layers} layers at d_inner {args.d_inner}, path cost {100 * gain:.1f}% below identity")
    for world in args.ranks:
        same = ""
        if world > 1:
            *times[world], decision = spread_decision(world, args.layers, args.d_inner)
            same = "identical to 1 process" if decision == single.to_dict() else "DIFFERENT from 1 process"
        wall, cpu = times[world]
        print(f"  {world} rank(s): {wall:.2f} s wall, {cpu:.2f} s CPU (max over ranks) "
              f"({1000 * cpu * world / args.layers:.0f} ms CPU per layer) {same}")

    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=256, n_layer=4, d_state=16, vocab_size=1000)).train()
    ids = torch.randint(0, 1000, (2, 2048))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    collectors = {stride: ScanStatsCollector(model, token_stride=stride) for stride in args.strides}
    best: dict = {}
    for _ in range(args.rounds):        # interleaved, so a load change hits every row alike
        for stride in [None] + args.strides:
            if stride is not None:
                collectors[stride].enable()
            t = timed(step)
            best[stride] = min(best.get(stride, t), t, key=lambda v: v[1])
            if stride is not None:
                collectors[stride].disable()
    base = best[None][1]
    # the hook alone, on the scan input of one layer of that step: steadier under load than the step A/B
    u = torch.randn(2, 2048, model.blocks[0].mixer.d_inner).transpose(1, 2)
    point = model.blocks[0].mixer.scan_input
    alone = {s: min(timed(lambda: c._hook(0)(point, (u,), u))[1] for _ in range(5)) for s, c in collectors.items()}
    print("statistics hook on a training step (hidden 256, 4 layers, batch 2, L 2048, "
          f"threads {torch.get_num_threads()}); 'alone': the hook's own CPU time x 4 layers, as a share of the step:")
    for stride, (wall, cpu) in best.items():
        label = "no hook" if stride is None else f"hook, token stride {stride}"
        own = "" if stride is None else \
            f"  alone {1000 * alone[stride]:6.1f} ms/layer = {100 * 4 * alone[stride] / base:5.1f}%"
        print(f"  {label:<22} {wall:7.3f} s wall {cpu:7.3f} s CPU  overhead {100 * (cpu / base - 1):+6.1f}% (CPU){own}")


if __name__ == "__main__":
    main()
