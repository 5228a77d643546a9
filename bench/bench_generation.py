"""Generation cost per token vs prompt length, and batched vs unbatched scoring.

    python bench/bench_generation.py [--d-model 256 --n-layer 4 --prompts 128,8192]

1. Generation: ms per new token after a prompt of 128 and of 8192 tokens, for our recurrent
   cache (one O(1) step per token) and for the alternative without a cache (re-reading the whole
   sequence for every token, what a model without recurrent state must do). Prints the ratios.
2. Scoring: rolling log-likelihood of WikiText windows with batch size 1 vs --batch-size.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.evaluation.likelihood import score_rolling
from adaptive_mamba.tokenizer import load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def next_token(model, ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Greedy next token; logits only at the last position (as the eval suite generates)."""
    return model.lm_head(model.hidden_states(ids, cache)[:, -1]).argmax(-1, keepdim=True)


@torch.no_grad()
def ms_per_token_cached(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Prefill once, then time `new_tokens` recurrent steps."""
    cache = model.allocate_cache(prompt.shape[0])
    token = next_token(model, prompt, cache)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = next_token(model, token, cache)
    return (time.perf_counter() - start) / new_tokens * 1e3


@torch.no_grad()
def ms_per_token_uncached(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Every new token re-reads the whole sequence so far."""
    seq = prompt
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = next_token(model, seq)
        seq = torch.cat([seq, token], dim=1)
    return (time.perf_counter() - start) / new_tokens * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--prompts", default="128,8192")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--uncached-tokens", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--score-windows", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="shared/data folder (WikiText + tokenizer)")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats (decayed recurrent states become denormal "
                        "and make CPU steps much slower)")
    args = p.parse_args()
    torch.set_flush_denormal(not args.keep_denormals)
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(
        d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)).eval()
    print(f"model: d_model={args.d_model} n_layer={args.n_layer} vocab={args.vocab}, "
          f"threads={torch.get_num_threads()}, flush_denormal={not args.keep_denormals}")

    print("\n== generation: ms per new token (batch 1) ==")
    print(f"{'prompt':>8} {'cached':>10} {'uncached':>10} {'uncached/cached':>16}")
    rows = {}
    for length in (int(x) for x in args.prompts.split(",")):
        prompt = torch.randint(2, args.vocab, (1, length))
        ms_per_token_cached(model, prompt[:, :64], 2)  # warm-up
        cached = ms_per_token_cached(model, prompt, args.new_tokens)
        uncached = ms_per_token_uncached(model, prompt, args.uncached_tokens)
        rows[length] = (cached, uncached)
        print(f"{length:>8} {cached:>10.2f} {uncached:>10.2f} {uncached / cached:>16.1f}")
    lengths = sorted(rows)
    lo, hi = lengths[0], lengths[-1]
    print(f"cached   ms/token at {hi} / at {lo}: {rows[hi][0] / rows[lo][0]:.2f}  (1.0 = independent of prompt)")
    print(f"uncached ms/token at {hi} / at {lo}: {rows[hi][1] / rows[lo][1]:.2f}")

    print("\n== rolling scoring: tokens per second ==")
    tokenizer = load_tokenizer(args.data / "tokenizers" / "gpt-neox-20b")
    text = (args.data / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    n_tokens = args.score_windows * args.max_length
    ids = tokenizer.encode(text[: n_tokens * 8])[:n_tokens]
    timings = {}
    for batch in (1, args.batch_size):
        score_rolling(model, [ids[:args.max_length]], 0, args.max_length, batch)  # warm-up
        start = time.perf_counter()
        score_rolling(model, [ids], 0, args.max_length, batch)
        timings[batch] = n_tokens / (time.perf_counter() - start)
        print(f"batch {batch:>3}: {timings[batch]:>10.0f} tok/s")
    print(f"batched / unbatched: {timings[args.batch_size] / timings[1]:.2f}x")


if __name__ == "__main__":
    main()
