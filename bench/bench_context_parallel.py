"""Long sequences on CPU: peak memory per rank and time per token of one forward + backward, side by side.

    python bench/bench_context_parallel.py --length 65536 --d-model 128 --n-layers 2 --chunk 8192

Each configuration runs in fresh processes, so each peak resident set is its own:
  one-pass  1 rank: the whole sequence in one forward/backward (`model(ids, labels=labels).loss`)
  chunked   1 rank: chunks of --chunk tokens, state carried, exact gradients (`adaptive_mamba.chunked`)
  serial    1 rank: the two context-parallel pieces one after the other, the state handed from the first to the
            second and its gradient back (one graph, no recomputation): the wall time of a serial hand-off of the
            state between 2 ranks, where neither piece can start before the other has finished (communication
            not counted, so it favours the serial form)
  cp2       2 ranks (gloo): two-pass context parallelism (`adaptive_mamba.context_parallel`)
--checkpointing turns on the model's activation checkpointing (per block, per piece / chunk) in every mode.
Printed: seconds per step (wall, slowest rank), process CPU seconds per rank, microseconds per token, peak RSS per
rank and its rise over the rank's RSS before the step (the activations), and the ratios against one-pass and of
two-pass against serial hand-off. On a shared machine the wall times depend on the load; CPU seconds less so.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.chunked import CarriedState, chunked_lm_loss, piece_loss_sum, shifted_targets, target_count
from adaptive_mamba.context_parallel import context_parallel_loss, piece_bounds
from adaptive_mamba.training.distributed import free_port


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def serial_hand_off_loss(model: AdaptiveMambaForCausalLM, ids: torch.Tensor, labels: torch.Tensor,
                         parts: int) -> torch.Tensor:
    """The pieces one after the other in one graph, each layer's final states handed to the next piece."""
    targets = shifted_targets(labels)
    states = [b.mixer.zero_state(ids.shape[0], ids.device, model.embedding.weight.dtype) for b in model.blocks]
    total = torch.zeros(())
    for start, stop in piece_bounds(ids.shape[1], parts):
        carried = [CarriedState(st.conv, st.ssm) for st in states]
        total = total + piece_loss_sum(model, ids[:, start:stop], targets[:, start:stop], carried)
        states = [c.outgoing() for c in carried]
    return total / target_count(labels)


def worker(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=args.d_model, n_layer=args.n_layers,
                                                         vocab_size=args.vocab,
                                                         gradient_checkpointing=args.checkpointing)).train()
    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(1))
    loss_fn = {"one-pass": lambda x: model(x, labels=x, return_logits=False).loss,
               "chunked": lambda x: chunked_lm_loss(model, x, x, args.chunk),
               "serial": lambda x: serial_hand_off_loss(model, x, x, 2),
               "cp2": lambda x: context_parallel_loss(model, x, x, dist.group.WORLD)}[mode]
    loss_fn(ids[:, :256]).backward()               # warm-up (first calls load the kernel): not timed
    model.zero_grad(set_to_none=True)
    before = rss_mib()
    times, cpu = [], []
    for _ in range(args.repeats):
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_fn(ids).backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.put((mode, rank, min(times), peak, peak - before, min(cpu)))
    if world > 1:
        del model
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=1, help="timed steps per configuration (the fastest is kept)")
    p.add_argument("--modes", default="one-pass,chunked,serial,cp2")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("spawn")
    rows = {}
    for mode in args.modes.split(","):
        world = 2 if mode == "cp2" else 1
        results = ctx.SimpleQueue()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, mode, args, results)) for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"{mode}: a rank exited with status {proc.exitcode}")
        got = [results.get() for _ in range(world)]
        seconds = max(g[2] for g in got)
        rows[mode] = seconds
        for _, rank, _, peak, rise, cpu in sorted(got, key=lambda g: g[1]):
            print(f"{mode:9s} rank {rank}: {seconds:8.2f} s/step {1e6 * seconds / args.length:8.2f} us/token "
                  f"{cpu:8.2f} CPU s peak RSS {peak:8.0f} MiB (+{rise:7.0f} MiB during the step)", flush=True)
    if "one-pass" in rows:
        for mode, seconds in rows.items():
            print(f"time ratio {mode} / one-pass: {seconds / rows['one-pass']:.2f}")
    if "serial" in rows and "cp2" in rows:
        print(f"time ratio two-pass (cp2) / serial hand-off: {rows['cp2'] / rows['serial']:.2f}")
    print(f"shapes: length {args.length}, d_model {args.d_model}, n_layers {args.n_layers}, vocab {args.vocab}, "
          f"batch 1, fp32, CPU, 1 thread per rank, activation checkpointing {'on' if args.checkpointing else 'off'}")


if __name__ == "__main__":
    main()
