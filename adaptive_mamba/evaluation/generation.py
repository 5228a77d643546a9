"""Text generation through the recurrent cache, with stop sequences.

The prompt is read once (prefill); each new token then costs one recurrent step whose price does
not depend on how long the prompt was. A state-space model has no attention mask, so padding a
prompt would change its state: prompts are batched only with prompts of the same token length
(e.g. the n samples of one HumanEval problem), never padded.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..tokenizer import Tokenizer


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@torch.no_grad()
def generate_batch(model: torch.nn.Module, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                   n: int, max_new_tokens: int, stops: Sequence[str] = (), temperature: float = 0.0,
                   top_p: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
    """`n` continuations of one prompt (the model's `stream_tokens`), each cut at its first stop sequence or
    end-of-text."""
    if not prompt_ids:
        raise ValueError("generate_batch: empty prompt; a prompt needs at least one token")
    device = next(model.parameters()).device
    inputs = torch.tensor([list(prompt_ids)] * n, dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in range(n)]
    texts = [""] * n
    done = [False] * n
    # the model's vocab may be padded past the tokenizer's: only the tokenizer's ids are sampled
    for step in model.stream_tokens(inputs, max_new_tokens, do_sample=temperature > 0, temperature=temperature,
                                    top_p=top_p, generator=generator, vocab_size=tokenizer.vocab_size):
        for row, token in enumerate(step.tolist()):
            if done[row]:
                continue
            if token == tokenizer.eos_id:
                done[row] = True
                continue
            generated[row].append(token)
            texts[row] = tokenizer.decode(generated[row])
            cut = _stop_index(texts[row], stops)
            if cut is not None:
                texts[row], done[row] = texts[row][:cut], True
        if all(done):
            break
    return texts


def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str],
             max_new_tokens: int, stops: Sequence[str] = (), samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             desc: str = "generate") -> list[list[str]]:
    """`samples` continuations for every prompt (one prefill per prompt, samples batched)."""
    if samples > 1 and temperature == 0:
        raise ValueError(f"{samples} greedy samples would be identical; set a temperature > 0 "
                         "(e.g. --temperature 0.8) or use 1 sample")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return [generate_batch(model, tokenizer, tokenizer.encode(p), samples, max_new_tokens, stops,
                           temperature, top_p, generator)
            for p in tqdm(prompts, desc=desc, leave=False)]
