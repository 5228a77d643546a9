"""Forward+backward time and peak memory: our Mamba vs transformers' MambaForCausalLM, same shapes, one run.

    python bench/bench_model.py                      # hidden 256, 4 layers, state 16, vocab 1000, batch 2
    python bench/bench_model.py --lengths 512 2048 --repeat 2

Each measurement runs in a fresh subprocess so that its peak memory (peak RSS growth during fwd+bwd, which
includes everything torch allocates on the CPU) is not polluted by the previous one. transformers runs with
`use_mambapy=True` (its parallel-scan fallback) at every length, and with its default sequential path only at
L=512 (it loops over time in Python and takes minutes beyond). Ours also runs at 32768 to show linear memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPE = dict(hidden=256, layers=4, state=16, vocab=1000, batch=2)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(impl: str, length: int, repeat: int) -> dict:
    import torch

    torch.manual_seed(0)
    if impl == "ours":
        from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM

        model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=SHAPE["hidden"], n_layer=SHAPE["layers"],
                                                             d_state=SHAPE["state"], vocab_size=SHAPE["vocab"]))
    else:
        from transformers import MambaConfig, MambaForCausalLM

        model = MambaForCausalLM(MambaConfig(hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"],
                                             state_size=SHAPE["state"], vocab_size=SHAPE["vocab"],
                                             use_mambapy=impl == "hf-mambapy"))
    model.train()

    def step(ids):
        return model(ids, labels=ids).loss

    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], length))
    step(ids[:, :64]).backward()              # warm-up (kernel build/load, allocator)
    model.zero_grad(set_to_none=True)
    base = rss_bytes()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loss = step(ids)
        loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "L": length, "seconds": min(times), "peak_mib": max(peak - base, 0) / 2**20}


def run_child(impl: str, length: int, repeat: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(length), str(repeat)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "L": length, "seconds": None, "peak_mib": None, "note": f"> {timeout:.0f} s"}
    except subprocess.CalledProcessError as err:
        return {"impl": impl, "L": length, "seconds": None, "peak_mib": None, "note": err.stderr.strip()[-200:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--ours-extra", type=int, nargs="*", default=[32768], help="lengths run for ours only")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "L", "REPEAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), int(args.child[2]))))
        return

    import torch

    print(f"shape {SHAPE}, torch {torch.__version__}, threads {torch.get_num_threads()}, fwd+bwd of the LM loss")
    rows = []
    for length in args.lengths:
        ours = run_child("ours", length, args.repeat, args.timeout)
        others = [run_child("hf-mambapy", length, args.repeat, args.timeout)]
        if length <= 512:
            others.append(run_child("hf-default", length, 1, args.timeout))
        for other in others:
            rows.append((length, ours, other))
    header = f"{'L':>6} | {'ours s':>8} | {'ours MiB':>9} | {'other':>11} | {'other s':>8} | {'other MiB':>9} | " \
             f"{'speedup':>7} | {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for length, ours, other in rows:
        speed = other["seconds"] / ours["seconds"] if other["seconds"] and ours["seconds"] else None
        mem = ours["peak_mib"] / other["peak_mib"] if other["peak_mib"] and ours["peak_mib"] else None
        print(f"{length:>6} | {fmt(ours['seconds'], '8.3f')} | {fmt(ours['peak_mib'], '9.0f')} | {other['impl']:>11} | "
              f"{fmt(other['seconds'], '8.3f')} | {fmt(other['peak_mib'], '9.0f')} | {fmt(speed, '6.1f')}x | "
              f"{fmt(mem, '9.2f')}" + (f"  ({other['note']})" if other.get("note") else ""))
    for length in args.ours_extra:
        ours = run_child("ours", length, 1, args.timeout)
        print(f"{length:>6} | {fmt(ours['seconds'], '8.3f')} | {fmt(ours['peak_mib'], '9.0f')} | (ours only)")


if __name__ == "__main__":
    main()
