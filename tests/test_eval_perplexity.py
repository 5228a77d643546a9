"""Perplexity: exact values for a uniform model, rolling windows, rolling vs recurrent agreement."""
from __future__ import annotations

import math
import re

import pytest
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.evaluation import sources, tasks
from adaptive_mamba.evaluation.likelihood import (
    PositionCurve,
    rolling_windows,
    score_recurrent,
    score_rolling,
)
from adaptive_mamba.evaluation.plots import nice_ticks, position_curve_svg, position_perplexities
from adaptive_mamba.tokenizer import load_tokenizer


class UniformLM(torch.nn.Module):
    """Zero logits over `vocab` entries, with the scoring interface of our model
    (hidden_states, lm_head, allocate_cache)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(1, vocab, bias=False)
        torch.nn.init.zeros_(self.lm_head.weight)

    def allocate_cache(self, batch: int) -> list[int]:
        return [0] * batch

    def hidden_states(self, input_ids, cache=None):
        if cache is not None:
            cache[:] = [n + input_ids.shape[1] for n in cache]
        return torch.zeros(*input_ids.shape, 1)


@pytest.fixture(scope="module")
def tokenizer(neox_tokenizer_dir):
    return load_tokenizer(neox_tokenizer_dir)


@pytest.fixture(scope="module")
def wiki_docs(shared_data):
    return sources.load_wikitext(shared_data / "wikitext-2")[:3]


@pytest.mark.parametrize("n,max_length", [(1, 4), (4, 4), (5, 4), (9, 4), (100, 7), (3, 1)])
def test_rolling_windows_score_every_token_once(n, max_length):
    scored = []
    for start, end, count in rolling_windows(n, max_length):
        assert 0 <= start < end and end - start <= max_length and 1 <= count <= end - start
        scored += list(range(end - count + 1, end + 1))  # target positions in [prefix] + tokens
    assert scored == list(range(1, n + 1))
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        rolling_windows(3, 0)


def test_uniform_model_has_vocab_size_perplexity(tokenizer, wiki_docs):
    vocab = 4096
    model = UniformLM(vocab)
    texts = [d["text"] for d in wiki_docs]
    # Real token ids folded into the small vocabulary (uniform scores do not depend on them).
    docs = [[t % vocab for t in d]
            for d in tokenizer.encode_batch([tasks.scoring_text("wikitext", t) for t in texts])]
    for scores in (score_rolling(model, docs, 0, max_length=512, batch_size=3),
                   score_recurrent(model, docs, 0, chunk_length=700)):
        assert [s.tokens for s in scores] == [len(d) for d in docs]
        summary = tasks.perplexity_summary(texts, [s.nll for s in scores], [s.tokens for s in scores])
        n_tok = sum(len(d) for d in docs)
        # float32 log-softmax per token: relative error ~1e-7 per token
        assert summary["token_perplexity"] == pytest.approx(vocab, rel=1e-5)
        assert summary["word_perplexity"] == pytest.approx(vocab ** (n_tok / summary["words"]), rel=1e-5)
        assert summary["byte_perplexity"] == pytest.approx(vocab ** (n_tok / summary["bytes"]), rel=1e-5)
        assert summary["bits_per_byte"] == pytest.approx(n_tok * math.log2(vocab) / summary["bytes"])
        assert summary["bytes"] == sum(len(t.encode()) for t in texts)
        assert summary["words"] == sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval's rule


def test_position_curve_and_plot(tokenizer, shared_data):
    book = (shared_data / "books" / "austen_emma.txt").read_text()[:20000]
    ids = [t % 64 for t in tokenizer.encode(book)]
    curve = PositionCurve(bucket=1000)
    scores = score_recurrent(UniformLM(64), [ids], 0, chunk_length=777, curve=curve)
    assert sum(curve.count) == scores[0].tokens == len(ids)
    assert curve.count[:-1] == [1000] * (len(curve.count) - 1)
    assert all(p == pytest.approx(64) for _, p in position_perplexities(curve))
    svg = position_curve_svg(curve, "uniform <64>")
    assert svg.startswith("<svg") and "polyline" in svg and "uniform &lt;64&gt;" in svg
    for label in ("0", "1,000", "5,000", "60", "80"):  # round ticks on both axes
        assert f">{label}</text>" in svg, label
    assert nice_ticks(0, 4400) == [0, 1000, 2000, 3000, 4000, 5000]
    assert nice_ticks(3.3, 7.9) == [3, 4, 5, 6, 7, 8]
    assert nice_ticks(0.012, 0.047) == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=2, vocab_size=50280)).eval()


def test_rolling_equals_recurrent_when_one_window_covers_the_document(tiny_model, tokenizer, wiki_docs):
    docs = [tokenizer.encode(tasks.scoring_text("wikitext", d["text"]))[:300] for d in wiki_docs]
    rolling = score_rolling(tiny_model, docs, tokenizer.eos_id, max_length=400, batch_size=3)
    recurrent = score_recurrent(tiny_model, docs, tokenizer.eos_id, chunk_length=64, batch_size=2)
    for a, b in zip(rolling, recurrent):
        assert a.tokens == b.tokens == 300
        assert a.nll == pytest.approx(b.nll, rel=1e-4)
    # Shorter windows lose context, so the two modes then differ (and the test can tell).
    short = score_rolling(tiny_model, docs, tokenizer.eos_id, max_length=16, batch_size=8)
    assert sum(s.nll for s in short) != pytest.approx(sum(s.nll for s in recurrent), rel=1e-6)


def test_recurrent_chunking_does_not_change_the_score(tiny_model, tokenizer, shared_data):
    ids = tokenizer.encode((shared_data / "books" / "kjv_bible.txt").read_text()[:6000])
    whole = score_recurrent(tiny_model, [ids], tokenizer.eos_id, chunk_length=len(ids) + 1)[0]
    chunked = score_recurrent(tiny_model, [ids], tokenizer.eos_id, chunk_length=97)[0]
    assert whole.tokens == chunked.tokens == len(ids)
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-4)
