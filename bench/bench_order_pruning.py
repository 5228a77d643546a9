"""What the scan order is for, measured: one-shot block pruning of d_inner channels at equal sparsity, with the
blocks formed by the correlation order (pillar 1), the identity order and random orders.

A small Mamba is trained briefly on Austen's Emma (GPT-NeoX tokenizer, ids compacted to the tokens that occur).
Scan-input statistics come from training forwards. Each channel gets a score sqrt(E[u_c^2]) * ||out_proj[:, c]||;
under a given order, consecutive runs of `block` channels form blocks, a block's score is the sum of its channels'
and the lowest-scoring half of the blocks of every layer is removed (channel masks: the whole channel goes). The
score-sorted order (channels sorted by score, so pruning blocks = pruning channels) is the best any order can do
under this criterion. Reported: held-out cross-entropy (nats/token) of each.

    .venv/bin/python bench/bench_order_pruning.py [--data ../shared/data] [--steps 300] [--seeds 5] [--model-seeds 1]
                                                  [--first-model-seed 0]
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.pillars import MaskConfig, ScanStatsCollector, apply_masks, decide_scan_order, masked_modules
from adaptive_mamba.tokenizer import load_tokenizer


def batches(ids: torch.Tensor, seq_len: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq_len] for s in starts])


def train(vocab: int, ids: torch.Tensor, args: argparse.Namespace, seed: int) -> AdaptiveMambaForCausalLM:
    torch.manual_seed(seed)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=args.d_model, n_layer=args.layers,
                                                         vocab_size=vocab)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for x in batches(ids, args.seq_len, args.batch, args.steps, seed):
        opt.zero_grad()
        model(x, labels=x, return_logits=False).loss.backward()
        opt.step()
    return model


@torch.no_grad()
def held_out_loss(model: AdaptiveMambaForCausalLM, ids: torch.Tensor, seq_len: int) -> float:
    model.eval()
    rows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    return float(model(rows, labels=rows, return_logits=False).loss)


@torch.no_grad()
def prune(model: AdaptiveMambaForCausalLM, orders: list[torch.Tensor], scores: list[torch.Tensor],
          block: int) -> AdaptiveMambaForCausalLM:
    """A copy with channel masks removing, per layer, the lowest-scoring half of the blocks of `orders`."""
    pruned = copy.deepcopy(model)
    apply_masks(pruned, MaskConfig(kind="channel"))
    for i, (order, score) in enumerate(zip(orders, scores)):
        blocks = order.view(-1, block)
        drop = blocks[score[blocks].sum(1).argsort()[: blocks.shape[0] // 2]].flatten()
        logits = masked_modules(pruned)[f"blocks.{i}.mixer.channel_mask"].mask_logits
        logits.fill_(1.0)
        logits[drop] = -1.0
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5, help="random orders per model")
    parser.add_argument("--model-seeds", type=int, default=1)
    parser.add_argument("--first-model-seed", type=int, default=0)
    args = parser.parse_args()
    tok = load_tokenizer(args.data / "tokenizers" / "gpt-neox-20b")
    text = (args.data / "books" / "austen_emma.txt").read_text()[:400_000]
    vocab, ids = torch.unique(torch.tensor(tok.encode(text)), return_inverse=True)
    split = int(0.9 * ids.numel())
    train_ids, val_ids = ids[:split], ids[split:]
    print(f"austen_emma.txt: {ids.numel()} tokens ({len(vocab)} distinct), d_model {args.d_model}, {args.layers} "
          f"layers, {args.steps} steps of {args.batch}x{args.seq_len}; blocks of {args.block} channels, 50% removed")
    rows: dict[str, list[float]] = {}
    for mseed in range(args.first_model_seed, args.first_model_seed + args.model_seeds):
        model = train(len(vocab), train_ids, args, mseed)
        collector = ScanStatsCollector(model)
        collector.enable()
        with torch.no_grad():
            for x in batches(train_ids, args.seq_len, args.batch, 16, 1000 + mseed):
                model(x)
        collector.disable()
        d = model.blocks[0].mixer.d_inner
        scores = [(outer.diagonal() / count).sqrt().float() * b.mixer.out_proj.weight.norm(dim=0)
                  for (_, outer, count), b in zip(collector.stats, model.blocks)]
        orders = {"correlation": [torch.tensor(p) for p in decide_scan_order(collector).perms],
                  "identity": [torch.arange(d)] * args.layers,
                  "score-sorted": [s.argsort() for s in scores]}
        for s in range(args.seeds):
            g = torch.Generator().manual_seed(100 * mseed + s)
            orders[f"random {s}"] = [torch.randperm(d, generator=g) for _ in range(args.layers)]
        rows.setdefault("dense", []).append(held_out_loss(model, val_ids, args.seq_len))
        for name, order in orders.items():
            key = "random" if name.startswith("random") else name
            rows.setdefault(key, []).append(held_out_loss(prune(model, order, scores, args.block), val_ids,
                                                          args.seq_len))
    print(f"{'order':<14} {'held-out CE':>12} {'std':>7} {'runs':>5}")
    for name, values in rows.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<14} {statistics.mean(values):>12.4f} {std:>7.4f} {len(values):>5}")


if __name__ == "__main__":
    main()
