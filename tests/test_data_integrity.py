"""Verified data and tokenizer identity: shard bytes against their sha256 (cached by size and mtime), token ids
against the tokenizer's range, and a content hash that tells tokenizers of the same vocabulary size apart."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from adaptive_mamba.data import CorruptShardError, DataPrepConfig, TokenShards, build_shards
from adaptive_mamba.tokenizer import (TokenizerMismatchError, check_same_tokenizer, load_tokenizer,
                                      saved_tokenizer_hash)


@pytest.fixture(scope="module")
def stdlib_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shards(DataPrepConfig(out_dir=tmp_path_factory.mktemp("stdlib"), source="stdlib",
                                       tokenizer="sentencepiece:512", max_bytes=1 << 18, val_fraction=0.1))


@pytest.fixture(scope="module")
def books_out(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of tokenizer and the same vocabulary size, trained on other text."""
    return build_shards(DataPrepConfig(out_dir=tmp_path_factory.mktemp("books"),
                                       source=f"folder:{shared_data / 'books'}", tokenizer="sentencepiece:512",
                                       max_bytes=1 << 18, val_fraction=0.0))


def _copy(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "data"))


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def test_overwritten_bytes_are_found_and_verification_is_cached(stdlib_out: Path, tmp_path: Path) -> None:
    data = _copy(stdlib_out, tmp_path)
    shards = TokenShards(data, "train")
    cache = shards.verify()
    assert len(cache) == len(shards.metadata["splits"]["train"]["shards"])
    shard = (data / shards.metadata["splits"]["train"]["shards"][0]["file"]).resolve()
    stat = shard.stat()
    _overwrite(shard, 100, b"\x01\x00\x02\x00")                  # 4 bytes: still valid ids, same size
    with pytest.raises(CorruptShardError, match=f"shard {shard} does not match the sha256"):
        shards.verify(cache)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))    # same size and mtime: the cached result holds
    assert shards.verify(cache) == cache
    with pytest.raises(CorruptShardError):                       # without the cache the bytes are read again
        shards.verify()


def test_ids_outside_the_vocabulary_are_refused_when_read(stdlib_out: Path, tmp_path: Path) -> None:
    data = _copy(stdlib_out, tmp_path)
    shards = TokenShards(data, "train")
    shard = data / shards.metadata["splits"]["train"]["shards"][0]["file"]
    first = int(shards.doc_start[0])
    _overwrite(shard, first * shards.dtype.itemsize, np.array([shards.vocab_size], dtype=shards.dtype).tobytes())
    shards = TokenShards(data, "train")
    assert shards.doc(0, 1, 5).size == 4                         # the untouched part still reads
    with pytest.raises(CorruptShardError, match=f"token id {shards.vocab_size} in document 0 is outside"):
        shards.doc(0, 0, 5)


def test_tokenizer_content_hash(stdlib_out: Path, books_out: Path, tmp_path: Path) -> None:
    stdlib_tok, books_tok = load_tokenizer(stdlib_out / "tokenizer"), load_tokenizer(books_out / "tokenizer")
    assert stdlib_tok.vocab_size == books_tok.vocab_size == 512
    assert stdlib_tok.content_hash() != books_tok.content_hash()
    assert saved_tokenizer_hash(stdlib_tok.save(tmp_path / "again")) == stdlib_tok.content_hash()
    (tmp_path / "empty").mkdir()
    assert saved_tokenizer_hash(tmp_path / "empty") is None
    assert json.loads((stdlib_out / "metadata.json").read_text())["tokenizer"]["content_sha256"] == \
        stdlib_tok.content_hash()
    with pytest.raises(TokenizerMismatchError, match="different tokenizer than the data"):
        check_same_tokenizer(stdlib_tok.content_hash(), books_tok.content_hash(), "the model", "the data")
    check_same_tokenizer(stdlib_tok.content_hash(), None, "a model without a tokenizer", "the data")


def test_neox_hash_is_stable_across_save(neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(neox_tokenizer_dir)
    assert saved_tokenizer_hash(tok.save(tmp_path / "neox")) == tok.content_hash()


def test_eval_refuses_a_tokenizer_other_than_the_models(stdlib_out: Path, books_out: Path, shared_data: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import sys

    import torch

    from adaptive_mamba import AdaptiveMambaForCausalLM
    from adaptive_mamba.config import AdaptiveMambaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    import run_suite

    torch.manual_seed(0)
    AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=16, n_layer=1, vocab_size=512)).save_pretrained(tmp_path)
    load_tokenizer(stdlib_out / "tokenizer").save(tmp_path)
    with pytest.raises(SystemExit) as exit_info:        # one line naming both tokenizers, exit 2 (bad input)
        run_suite.main(["--model", str(tmp_path), "--tokenizer", str(books_out / "tokenizer"), "--tasks", "wikitext",
                        "--data-dir", str(shared_data), "--out", str(tmp_path / "results.json")])
    assert exit_info.value.code == 2
    assert f"the model {tmp_path} was made with a different tokenizer" in capsys.readouterr().err
