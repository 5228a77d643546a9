"""Pillar 1 on real text: path cost sum(1 - |rho|) of the scan input's channel order, identity vs random orders vs
the nearest-neighbour path vs after 2-opt, per layer, from the activations of a model fed Austen's Emma through
the GPT-NeoX tokenizer. Also times the decision.

    .venv/bin/python bench/bench_scan_order.py [--data ../shared/data] [--d-model 256] [--layers 4] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.pillars.scan_order import ScanStatsCollector, correlation, decide_scan_order, path_cost
from adaptive_mamba.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    tok = load_tokenizer(args.data / "tokenizers" / "gpt-neox-20b")
    text = (args.data / "books" / "austen_emma.txt").read_text()
    ids = torch.tensor(tok.encode(text[: args.tokens * 8])[: args.tokens]).view(-1, 1024)
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=args.d_model, n_layer=args.layers,
                                                         vocab_size=tok.vocab_size)).train()  # collector: training forwards
    collector = ScanStatsCollector(model)
    collector.enable()
    with torch.no_grad():
        for row in ids:
            model(row[None])
    collector.disable()
    t = time.perf_counter()
    decision = decide_scan_order(collector)
    elapsed = time.perf_counter() - t
    print(f"{ids.numel()} tokens of austen_emma.txt, d_model {args.d_model} (d_inner {2 * args.d_model}), "
          f"{args.layers} layers, random init; decision took {elapsed:.2f} s")
    print(f"{'layer':<6} {'identity':>9} {'random':>9} {'greedy':>9} {'2-opt':>9} {'vs identity':>12} {'vs random':>10}")
    rng = np.random.default_rng(0)
    for i, stats in enumerate(collector.stats):
        cost = 1 - np.abs(correlation(stats))
        rand = float(np.mean([path_cost(cost, rng.permutation(cost.shape[0])) for _ in range(10)]))
        ci, cg, ca = decision.cost_identity[i], decision.cost_greedy[i], decision.cost_after[i]
        print(f"{i:<6} {ci:>9.2f} {rand:>9.2f} {cg:>9.2f} {ca:>9.2f} {100 * (1 - ca / ci):>11.1f}% "
              f"{100 * (1 - ca / rand):>9.1f}%")


if __name__ == "__main__":
    main()
