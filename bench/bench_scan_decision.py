"""Cost of pillar 1 at 130M width: the scan-order decision for 24 layers at d_inner 1536, and the statistics
hook's overhead on a training step (ours, hidden 256, 4 layers, batch 2, L 2048, fwd+bwd), in one run.

    python bench/bench_scan_decision.py [--layers 24] [--d-inner 1536] [--strides 1 8]

The layers' statistics come from synthetic activations whose channels are driven by shared latent factors
(structured correlations, shuffled), 3 distinct layers repeated. Times are wall and process CPU time (the machine
may be shared; CPU time is the steadier of the two).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.pillars.scan_order import ScanStatsCollector, decide_scan_order


def layer_stats(d: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((tokens, d // 16)).astype(np.float32)
    x = np.repeat(factors, 16, axis=1) + rng.standard_normal((tokens, d), dtype=np.float32)
    x = torch.from_numpy(x[:, rng.permutation(d)]).double()
    return x.sum(0), x.T @ x, torch.tensor(float(tokens), dtype=torch.float64)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-inner", type=int, default=1536)
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 8], help="token strides of the hook")
    args = parser.parse_args()

    distinct = [layer_stats(args.d_inner, 2048, seed) for seed in range(3)]
    stats = [distinct[i % 3] for i in range(args.layers)]
    box = {}
    wall, cpu = timed(lambda: box.update(d=decide_scan_order(stats)))
    d = box["d"]
    gain = np.mean([1 - a / i for a, i in zip(d.cost_after, d.cost_identity)])
    print(f"decision: {args.layers} layers at d_inner {args.d_inner}: {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"({1000 * cpu / args.layers:.0f} ms CPU per layer); path cost {100 * gain:.1f}% below identity")

    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=256, n_layer=4, d_state=16, vocab_size=1000)).train()
    ids = torch.randint(0, 1000, (2, 2048))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    rows = []
    for stride in [None] + args.strides:
        collector = None
        if stride is not None:
            collector = ScanStatsCollector(model, token_stride=stride)
            collector.enable()
        rows.append((stride, min((timed(step) for _ in range(2)), key=lambda t: t[1])))
        if collector is not None:
            collector.disable()
    base = rows[0][1][1]
    print("statistics hook on a training step (hidden 256, 4 layers, batch 2, L 2048, "
          f"threads {torch.get_num_threads()}):")
    for stride, (wall, cpu) in rows:
        label = "no hook" if stride is None else f"hook, token stride {stride}"
        print(f"  {label:<22} {wall:7.3f} s wall {cpu:7.3f} s CPU  overhead {100 * (cpu / base - 1):+6.1f}% (CPU)")


if __name__ == "__main__":
    main()
