"""Peak memory of one training step (forward + backward + AdamW step) vs sequence length, with and without
activation checkpointing of each Mamba block. Each measurement runs in a fresh process, so the peak resident set
size (CPU) or the CUDA allocator peak belongs to that configuration alone.

    python bench/bench_train_memory.py                       # d_model 256, 4 layers, L = 2k..16k
    python bench/bench_train_memory.py --d-model 768 --n-layers 24 --lengths 4096 16384 65536   # on a GPU

Prints a table and the ratio without/with checkpointing, and the growth per doubling of L (linear = 2x).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_step(d_model: int, n_layers: int, seq_len: int, checkpointing: bool, vocab: int) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=d_model, n_layer=n_layers, vocab_size=vocab,
                                                         gradient_checkpointing=checkpointing)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (1, seq_len), device=device)
    # warm-up on a short sequence (kernel build, allocator, optimizer state), then measure the long one
    model(ids[:, :256], labels=ids[:, :256], return_logits=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    base = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seq_len": seq_len, "checkpointing": checkpointing, "peak_mib": peak / 2 ** 20,
            "step_mib": max(peak - base, 0) / 2 ** 20, "seconds": seconds, "loss": float(loss), "device": device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        seq_len, ckpt = args.worker.split(",")
        print(json.dumps(one_step(args.d_model, args.n_layers, int(seq_len), ckpt == "1", args.vocab)))
        return
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                   str(REPO / ".cache" / "torch_extensions"))}
    rows = []
    for seq_len in args.lengths:
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, "--d-model", str(args.d_model), "--n-layers",
                                  str(args.n_layers), "--vocab", str(args.vocab), "--worker", f"{seq_len},{int(ckpt)}"],
                                 capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"L={seq_len:6d} checkpointing={'on ' if ckpt else 'off'} peak {r['peak_mib']:8.0f} MiB, "
                  f"step adds {r['step_mib']:8.0f} MiB, {r['seconds']:6.2f} s ({r['device']})", flush=True)
    print(f"\nd_model={args.d_model} n_layers={args.n_layers} vocab={args.vocab}, batch 1, one fwd+bwd+AdamW step")
    print(f"{'seq_len':>8} {'no ckpt MiB':>12} {'ckpt MiB':>10} {'ratio':>6} {'ckpt s':>7} {'no ckpt s':>9}")
    by = {(r["seq_len"], r["checkpointing"]): r for r in rows}
    for seq_len in args.lengths:
        a, b = by[(seq_len, False)], by[(seq_len, True)]
        print(f"{seq_len:8d} {a['step_mib']:12.0f} {b['step_mib']:10.0f} {a['step_mib'] / max(b['step_mib'], 1e-9):6.2f} "
              f"{b['seconds']:7.2f} {a['seconds']:9.2f}")
    for ckpt in (False, True):
        growth = [by[(l2, ckpt)]["step_mib"] / max(by[(l1, ckpt)]["step_mib"], 1e-9)
                  for l1, l2 in zip(args.lengths, args.lengths[1:])]
        print(f"growth per step of L ({'ckpt' if ckpt else 'no ckpt'}): " + ", ".join(f"{g:.2f}x" for g in growth))


if __name__ == "__main__":
    main()
