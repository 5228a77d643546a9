"""Where the time of one training step goes: fwd+bwd of the LM loss at the shape of bench/bench_model.py (hidden 256,
4 layers, state 16, vocab 1000, batch 2), broken down by torch's profiler into the scan, the projections, the conv,
the norms, the loss (LM head + cross-entropy), and everything else (elementwise ops, copies, the optimizer-free
remainder).

    python bench/profile_step.py                       # L = 2048 and 8192
    python bench/profile_step.py --lengths 8192 --threads 2 --top 15

Each op's self time is assigned to one category by its name (the LM head's matmuls by their vocab-sized shape);
`--top` also prints the most expensive ops so that "everything else" can be read in detail.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM

SHAPE = dict(hidden=256, layers=4, state=16, vocab=1000, batch=2)
CATEGORIES = ("scan", "projections", "conv", "norm", "loss", "everything else")
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")


def category(name: str, shapes: list, vocab: int) -> str:
    """The category of one profiler op (self time only, so nothing is counted twice)."""
    lowered = name.lower()
    if "selectivescan" in lowered or "softplus" in lowered:
        return "scan"
    if "conv1dsilu" in lowered or "convolution" in lowered:
        return "conv"
    if name in _MATMUL:
        return "loss" if any(vocab in s for s in shapes if isinstance(s, list)) else "projections"
    if any(k in lowered for k in ("log_softmax", "nll_loss", "cross_entropy")):
        return "loss"
    if any(k in lowered for k in ("rsqrt", "aten::pow", "aten::mean")):
        return "norm"
    return "everything else"


def profile_step(length: int, top: int) -> None:
    torch.manual_seed(0)
    config = AdaptiveMambaConfig(d_model=SHAPE["hidden"], n_layer=SHAPE["layers"], d_state=SHAPE["state"],
                                 vocab_size=SHAPE["vocab"])
    model = AdaptiveMambaForCausalLM(config).train()
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], length))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    step()                                                       # warm-up (kernel load, allocator)
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    totals = dict.fromkeys(CATEGORIES, 0.0)
    ops = []
    for avg in prof.key_averages(group_by_input_shape=True):
        cat = category(avg.key, avg.input_shapes, config.padded_vocab_size)
        totals[cat] += avg.self_cpu_time_total / 1e6
        ops.append((avg.self_cpu_time_total / 1e6, avg.key, cat))
    profiled = sum(totals.values())
    threads = torch.get_num_threads()
    print(f"\nL = {length}: step {wall:.3f} s unprofiled, {profiled:.3f} s profiled (threads {threads})")
    print(f"{'category':<16} | {'seconds':>8} | {'share':>6}")
    for cat in CATEGORIES:
        print(f"{cat:<16} | {totals[cat]:>8.3f} | {100 * totals[cat] / profiled:>5.1f}%")
    if top:
        print(f"top {top} ops by self time:")
        for seconds, name, cat in sorted(ops, reverse=True)[:top]:
            print(f"  {seconds:8.3f} s  {name:<50} ({cat})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--top", type=int, default=10, help="also list the N most expensive ops")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"shape {SHAPE}, torch {torch.__version__}, fwd+bwd of the LM loss")
    for length in args.lengths:
        profile_step(length, args.top)


if __name__ == "__main__":
    main()
