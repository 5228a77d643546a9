"""Window loader: exact once-per-epoch coverage across ranks, exact resume, memory-mapped reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_mamba.data import IGNORE_INDEX, DataPrepConfig, TokenShards, WindowSampler, build_shards


@pytest.fixture(scope="module")
def wiki_shards(shared_data: Path, neox_tokenizer_dir: Path, tmp_path_factory) -> TokenShards:
    cfg = DataPrepConfig(out_dir=tmp_path_factory.mktemp("wiki"), articles="wikitext",
                         source=f"folder:{shared_data / 'wikitext-2' / 'wiki.test.raw'}",
                         tokenizer=f"hf:{neox_tokenizer_dir}", shard_size_mb=0.3, val_fraction=0.1)
    return TokenShards(build_shards(cfg), "train")


def _stream(shards: TokenShards, order: np.ndarray) -> np.ndarray:
    eos = np.array([shards.eos_id])
    return np.concatenate([np.concatenate([shards.doc(int(d)), eos]) for d in order]).astype(np.int64)


def _epoch_rows(shards: TokenShards, world: int, **kw) -> tuple[list, list]:
    """All rows of one epoch from every rank: (window ids, (input_ids, labels) rows)."""
    ids, rows = [], []
    for rank in range(world):
        s = WindowSampler(shards, rank=rank, world_size=world, **kw)
        for step in range(len(s)):
            batch = s.batch_at(step)
            for w, x, y in zip(s.window_ids_at(step), batch["input_ids"], batch["labels"]):
                ids.append(w)
                rows.append((w, x.numpy(), y.numpy()))
    return ids, rows


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_every_token_once_per_epoch_across_two_ranks(wiki_shards: TokenShards, mode: str) -> None:
    kw = dict(seq_len=512, batch_size=3, seed=7)
    ids, rows = _epoch_rows(wiki_shards, 2, mode=mode, **kw)
    real = [w for w in ids if w is not None]
    n_windows = WindowSampler(wiki_shards, mode=mode, **kw).layout(0).n_windows
    assert sorted(real) == list(range(n_windows))  # no overlap, no gap
    assert len(ids) - len(real) < 2 * 3  # padding rows only fill the last step
    lay = WindowSampler(wiki_shards, mode=mode, **kw).layout(0)
    stream = _stream(wiki_shards, lay.doc_order)
    n_real_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, _, y in rows)
    assert n_real_tokens == wiki_shards.num_tokens + len(wiki_shards) == len(stream)
    by_window = {w: x[y != IGNORE_INDEX] for w, x, y in rows if w is not None}
    for w, x, y in rows:
        assert np.array_equal(x[y != IGNORE_INDEX], y[y != IGNORE_INDEX])
        if w is None:
            assert (y == IGNORE_INDEX).all()
    rebuilt = np.concatenate([by_window[w] for w in range(n_windows)])
    assert np.array_equal(rebuilt, stream)  # windows are the stream, in order, EOS-separated
    if mode == "pad":  # one document per window: an EOS can only be a window's last real token
        for tokens in by_window.values():
            assert (tokens[:-1] != wiki_shards.eos_id).all()
    else:
        assert all(len(t) == 512 for w, t in by_window.items() if w != n_windows - 1)


def test_resume_at_step_k_gives_the_same_batches(wiki_shards: TokenShards) -> None:
    kw = dict(seq_len=256, batch_size=2, rank=1, world_size=2, seed=3)
    full = WindowSampler(wiki_shards, **kw)
    full.set_epoch(2)
    reference = list(full)
    assert len(reference) == len(full) > 10
    first = WindowSampler(wiki_shards, **kw)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    resumed = WindowSampler(wiki_shards, **kw)  # a fresh process would build exactly this
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 7
    for a, b in zip(rest, reference[7:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(wiki_shards, **{**kw, "seq_len": 128}).load_state_dict(state)


def test_epochs_and_seeds_change_the_order(wiki_shards: TokenShards) -> None:
    s = WindowSampler(wiki_shards, seq_len=256, batch_size=2, seed=0)
    b0 = s.batch_at(0, epoch=0)["input_ids"]
    assert torch.equal(b0, WindowSampler(wiki_shards, seq_len=256, batch_size=2, seed=0)
                       .batch_at(0, epoch=0)["input_ids"])
    assert not torch.equal(b0, s.batch_at(0, epoch=1)["input_ids"])
    assert not torch.equal(b0, WindowSampler(wiki_shards, seq_len=256, batch_size=2, seed=1)
                           .batch_at(0, epoch=0)["input_ids"])


def test_long_windows_from_memory_map(shared_data: Path, neox_tokenizer_dir: Path,
                                      tmp_path: Path) -> None:
    """64k-token windows over the KJV come from np.memmap views, and decode to the book's text."""
    src = shared_data / "books" / "kjv_bible.txt"
    cfg = DataPrepConfig(out_dir=tmp_path, source=f"folder:{src}", val_fraction=0.0,
                         tokenizer=f"hf:{neox_tokenizer_dir}")
    shards = TokenShards(build_shards(cfg), "train")
    assert isinstance(shards._map(0), np.memmap)
    assert isinstance(shards.doc(0, 10, 20).base, np.memmap)  # a view, nothing copied
    s = WindowSampler(shards, seq_len=65536, batch_size=2, rank=0, world_size=2, seed=0,
                      mode="pad")
    assert len(s) * 4 >= shards.num_tokens // 65536 + 1
    text = src.read_text(encoding="utf-8")
    tok = shards.tokenizer()
    batch = s.batch_at(1)
    for w, x, y in zip(s.window_ids_at(1), batch["input_ids"], batch["labels"]):
        assert x.shape == (65536,)
        real = x[y != IGNORE_INDEX].tolist()
        if real[-1] == shards.eos_id:
            real = real[:-1]
        piece = tok.decode(real)
        assert piece in text and len(piece) > 100000
        assert text.index(piece) == len(tok.decode(shards.doc(0, 0, w * 65536)))


def test_bad_arguments(wiki_shards: TokenShards) -> None:
    with pytest.raises(ValueError, match="rank 2 not in"):
        WindowSampler(wiki_shards, seq_len=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="mode must be"):
        WindowSampler(wiki_shards, seq_len=8, mode="chunk")
    with pytest.raises(IndexError, match="outside epoch"):
        WindowSampler(wiki_shards, seq_len=8).batch_at(10**9)
