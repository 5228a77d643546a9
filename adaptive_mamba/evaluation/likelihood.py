"""Log-likelihood of whole documents, in two modes.

* rolling (lm-evaluation-harness `loglikelihood_rolling`): the document, prefixed with the
  end-of-text token, is cut into windows of `max_length` tokens; each token is scored exactly
  once, with as much preceding context as fits in its window. Windows of many documents are
  scored in batches.
* recurrent (only a state-space model allows it): the document is fed in chunks with the
  recurrent state carried across chunks, so every token sees the whole document before it, at
  any length, and memory depends on the chunk length, not on the document length.

The model needs `hidden_states(input_ids, cache)`, `lm_head` and `allocate_cache(batch)` (the
interface of `AdaptiveMambaForCausalLM`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..model import vocab_nll


@dataclass
class DocScore:
    """Summed negative log-likelihood (nats) of a document's tokens, and how many were scored."""

    nll: float = 0.0
    tokens: int = 0


@dataclass
class PositionCurve:
    """NLL summed per block of `bucket` token positions (over all documents), for ppl(position)."""

    bucket: int
    nll: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)

    def add(self, start: int, token_nll: torch.Tensor) -> None:
        """Add the NLL of consecutive tokens at positions start, start+1, ..."""
        positions = torch.arange(start, start + token_nll.numel()) // self.bucket
        n_buckets = int(positions[-1]) + 1
        while len(self.nll) < n_buckets:
            self.nll.append(0.0)
            self.count.append(0)
        sums = torch.zeros(n_buckets, dtype=torch.float64).index_add_(0, positions, token_nll.double())
        counts = torch.bincount(positions, minlength=n_buckets)
        for b in range(int(positions[0]), n_buckets):
            self.nll[b] += float(sums[b])
            self.count[b] += int(counts[b])


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """lm-eval's disjoint rolling windows over `[prefix] + tokens` as (start, end, n_scored):
    inputs are full[start:end], targets full[start+1:end+1], of which the last n_scored count."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (got {max_length})")
    if n_tokens == 0:
        return []
    first = min(max_length, n_tokens)
    windows = [(0, first, first)]
    predicted = first
    while predicted < n_tokens:
        n = min(n_tokens - predicted, max_length)
        end = predicted + n
        windows.append((end - max_length, end, n))
        predicted = end
    return windows


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
              cache=None, chunk: int = 512) -> torch.Tensor:
    """Per-position NLL (B, L) in float32, on the CPU, with (B, L, vocab) logits never held at once (the model's
    `vocab_nll`); with `cache`, the sequence continues from it (and the cache is updated in place)."""
    hidden = model.hidden_states(input_ids, cache)
    return vocab_nll(model.lm_head, hidden, targets.to(hidden.device), chunk, per_position=True).cpu()


@torch.no_grad()
def score_rolling(model: torch.nn.Module, docs: Sequence[Sequence[int]], prefix_token: int,
                  max_length: int, batch_size: int = 4, desc: str = "rolling") -> list[DocScore]:
    """Rolling-window log-likelihood of each document (see module docstring)."""
    device = _device(model)
    fulls = [[prefix_token, *doc] for doc in docs]
    jobs = [(d, *w) for d, doc in enumerate(docs) for w in rolling_windows(len(doc), max_length)]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)  # similar lengths batch together
    scores = [DocScore() for _ in docs]
    for i in tqdm(range(0, len(jobs), batch_size), desc=desc, leave=False):
        batch = jobs[i:i + batch_size]
        width = max(end - start for _, start, end, _ in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (d, start, end, n) in enumerate(batch):
            length = end - start  # right padding is harmless: the model is causal
            inputs[row, :length] = torch.tensor(fulls[d][start:end])
            targets[row, :length] = torch.tensor(fulls[d][start + 1:end + 1])
            mask[row, length - n:length] = True
        nll = token_nll(model, inputs.to(device), targets)
        for row, (d, _, _, n) in enumerate(batch):
            scores[d].nll += float(nll[row][mask[row]].double().sum())
            scores[d].tokens += n
    return scores


@torch.no_grad()
def score_recurrent(model: torch.nn.Module, docs: Sequence[Sequence[int]], prefix_token: int,
                    chunk_length: int = 2048, batch_size: int = 1,
                    curve: PositionCurve | None = None, desc: str = "recurrent") -> list[DocScore]:
    """Whole-document log-likelihood with the recurrent state carried across chunks."""
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be >= 1 (got {chunk_length})")
    device = _device(model)
    order = sorted(range(len(docs)), key=lambda d: len(docs[d]), reverse=True)
    scores = [DocScore() for _ in docs]
    total = sum(len(doc) for doc in docs)
    with tqdm(total=total, desc=desc, unit="tok", leave=False) as bar:
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            fulls = [torch.tensor([prefix_token, *docs[d]], dtype=torch.long) for d in batch]
            lengths = [len(f) - 1 for f in fulls]  # number of scored tokens per document
            cache = model.allocate_cache(len(batch))
            for start in range(0, max(lengths), chunk_length):
                end = min(start + chunk_length, max(lengths))
                inputs = torch.zeros(len(batch), end - start, dtype=torch.long)
                targets = torch.zeros(len(batch), end - start, dtype=torch.long)
                for row, full in enumerate(fulls):
                    piece = full[start:end + 1]  # right padding past a document's end is ignored
                    inputs[row, :max(0, len(piece) - 1)] = piece[:-1]
                    targets[row, :max(0, len(piece) - 1)] = piece[1:]
                nll = token_nll(model, inputs.to(device), targets, cache)
                for row, d in enumerate(batch):
                    n = max(0, min(end, lengths[row]) - start)
                    if n:
                        scores[d].nll += float(nll[row, :n].double().sum())
                        scores[d].tokens += n
                        if curve is not None:
                            curve.add(start, nll[row, :n])
                bar.update(sum(max(0, min(end, n) - start) for n in lengths))
    return scores
