"""Evaluation speed of masked projections, side by side: the dense nn.Linear, a 50% structured mask on the d_inner
side (kept channel blocks gathered into a smaller dense matmul: MaskedLinear on the fly and the compiled
CompactLinear) and a 50% unstructured mask (dense matmul with zeros), on the projections of one 130M-shaped Mamba
layer; then the whole mixer with a 50% channel mask (dense, gathered on the fly, compiled). FLOPs come from the
executed shapes; times are the best over interleaved rounds.

    .venv/bin/python bench/bench_masks.py [--tokens 4096] [--repeats 20] [--block-size 16] [--mixer-tokens 2048]
                                          [--mixer-repeats 5] [--only-mixer]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.flops import mixer_flops
from adaptive_mamba.pillars.common import D_INNER_SIDE
from adaptive_mamba.pillars.masks import ChannelMask, CompactLinear, MaskConfig, MaskedLinear, compact_mixer

MAIN = ("in_proj", "x_proj", "out_proj")       # the projections whose structured masks gather


def half_masked(linear: nn.Linear, kind: str, side: str, block_size: int, seed: int) -> MaskedLinear:
    """A MaskedLinear over `linear` whose hard mask drops exactly half of the blocks (or weights), at random."""
    m = MaskedLinear(linear.in_features, linear.out_features, linear.bias is not None, kind,
                     side if kind == "structured" else None, block_size, 1)
    m.weight, m.bias = linear.weight, linear.bias
    n = m.mask_logits.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.mask_logits.copy_(torch.where(order < n // 2, 1.0, -1.0).view_as(m.mask_logits))
    return m.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--mixer-tokens", type=int, default=2048)
    parser.add_argument("--mixer-repeats", type=int, default=5)
    parser.add_argument("--only-mixer", action="store_true", help="skip the per-projection table")
    args = parser.parse_args()
    if args.only_mixer:
        return mixer_section(args.mixer_tokens, args.mixer_repeats)
    torch.manual_seed(0)
    cfg = AdaptiveMambaConfig()          # mamba-130m shapes: d_model 768, d_inner 1536, dt_rank 48, d_state 16
    shapes = {"in_proj": (cfg.d_model, 2 * cfg.d_inner, False), "x_proj": (cfg.d_inner, cfg.resolved_dt_rank + 2 *
              cfg.d_state, False), "dt_proj": (cfg.resolved_dt_rank, cfg.d_inner, True),
              "out_proj": (cfg.d_inner, cfg.d_model, False)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, fp32, eval mode, "
          f"block size {args.block_size}, best of {args.repeats}")
    header = (f"{'projection':<10} {'dense ms':>9} {'struct ms':>10} {'compiled':>9} {'unstruct':>9} "
              f"{'speedup':>8} {'compiled':>9} {'FLOPs exec/dense':>17}")
    print(header)
    variants, inputs = {}, {}
    for i, (proj, (fan_in, fan_out, bias)) in enumerate(shapes.items()):
        dense = nn.Linear(fan_in, fan_out, bias=bias).eval()
        structured = half_masked(dense, "structured", D_INNER_SIDE[proj], args.block_size, i)
        variants[proj] = [dense, structured, CompactLinear(structured),
                          half_masked(dense, "unstructured", "", args.block_size, i)]
        inputs[proj] = torch.randn(1, args.tokens, fan_in)
        with torch.inference_mode():
            torch.testing.assert_close(variants[proj][1](inputs[proj]), variants[proj][2](inputs[proj]))
    # Rounds over every (projection, variant) in turn; the best time of each over the rounds is the least disturbed
    # by other jobs on the machine, and load changes hit every variant alike.
    best = {proj: [float("inf")] * 4 for proj in shapes}
    with torch.inference_mode():
        for _ in range(args.repeats + 2):
            for proj, mods in variants.items():
                for k, module in enumerate(mods):
                    t = time.perf_counter()
                    module(inputs[proj])
                    best[proj][k] = min(best[proj][k], time.perf_counter() - t)
    totals, flops = [0.0] * 4, [0, 0]
    for proj, times in best.items():
        structured = variants[proj][1]
        exec_flops, dense_flops = structured.executed_flops(args.tokens), 2 * args.tokens * structured.weight.numel()
        if proj in MAIN:
            totals = [a + b for a, b in zip(totals, times)]
            flops = [flops[0] + exec_flops, flops[1] + dense_flops]
        print(f"{proj:<10} {1e3 * times[0]:>9.2f} {1e3 * times[1]:>10.2f} {1e3 * times[2]:>9.2f} "
              f"{1e3 * times[3]:>9.2f} {times[0] / times[1]:>7.2f}x {times[0] / times[2]:>8.2f}x "
              f"{exec_flops / dense_flops:>17.3f}")
    print(f"{'in+x+out':<10} {1e3 * totals[0]:>9.2f} {1e3 * totals[1]:>10.2f} {1e3 * totals[2]:>9.2f} "
          f"{1e3 * totals[3]:>9.2f} {totals[0] / totals[1]:>7.2f}x {totals[0] / totals[2]:>8.2f}x "
          f"{flops[0] / flops[1]:>17.3f}")
    print(f"in_proj + x_proj + out_proj, 50% structured masks vs dense: {totals[0] / totals[1]:.2f}x faster on the fly, "
          f"{totals[0] / totals[2]:.2f}x compiled; 50% unstructured: {totals[0] / totals[3]:.2f}x; executed FLOPs "
          f"{flops[0] / flops[1]:.3f} of dense. dt_proj ({shapes['dt_proj'][0]} inputs < GATHER_MIN_FAN_IN) runs its "
          "masked dense matmul.")
    mixer_section(args.mixer_tokens, args.mixer_repeats)


def best_times(variants: list, x: torch.Tensor, repeats: int) -> list[float]:
    """Best wall time of each callable over interleaved rounds (load changes hit every variant alike)."""
    best = [float("inf")] * len(variants)
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for k, fn in enumerate(variants):
                t = time.perf_counter()
                fn(x)
                best[k] = min(best[k], time.perf_counter() - t)
    return best


def mixer_section(tokens: int, repeats: int) -> None:
    """The whole mixer (projections, conv, scan) at evaluation with a 50% channel mask: the dense mixer, the masked
    mixer (kept channels gathered on every forward) and the compiled mixer of the kept channels (the export)."""
    cfg = AdaptiveMambaConfig(n_layer=1, vocab_size=8)
    dense = AdaptiveMambaForCausalLM(cfg).blocks[0].mixer.eval()       # mamba-ssm's initialisation
    masked = copy.deepcopy(dense)
    masked.channel_mask = ChannelMask(masked, MaskConfig(kind="channel"), cfg).eval()
    order = torch.randperm(cfg.d_inner, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked.channel_mask.mask_logits.copy_(torch.where(order < cfg.d_inner // 2, 1.0, -1.0))
    compact = compact_mixer(masked, masked.channel_mask).eval()
    x = torch.randn(1, tokens, cfg.d_model)
    with torch.inference_mode():
        torch.testing.assert_close(masked(x)[0], compact(x)[0])
    times = best_times([dense, masked, compact], x, repeats)
    kept = int(masked.channel_mask.hard_mask().sum())
    ratio = sum(mixer_flops(cfg, kept, tokens).values()) / sum(mixer_flops(cfg, cfg.d_inner, tokens).values())
    print(f"whole mixer (d_model {cfg.d_model}, d_inner {cfg.d_inner}, d_state {cfg.d_state}), {tokens} tokens, "
          f"50% channel mask, best of {repeats}: dense {1e3 * times[0]:.1f} ms, masked (gathered on the fly) "
          f"{1e3 * times[1]:.1f} ms ({times[0] / times[1]:.2f}x), compiled {1e3 * times[2]:.1f} ms "
          f"({times[0] / times[2]:.2f}x); executed FLOPs {ratio:.3f} of dense")


if __name__ == "__main__":
    main()
