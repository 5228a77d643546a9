"""Tokenising through safe cuts: exact ids on every book for each tokenizer kind, every cut of adversarial strings,
refusal of configurations whose cuts are not proven, and the bulk encoder's chunking and piece cache."""
from __future__ import annotations

import copy
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from adaptive_mamba.data import DataPrepConfig, TokenShards, build_shards
from adaptive_mamba.data.bulk_encode import BulkEncoder
from adaptive_mamba.tokenizer import (HFTokenizer, SentencePieceTokenizer, _byte_level_cut_pattern,
                                      _sentencepiece_cut_pattern, load_tokenizer, train_sentencepiece)

# Fragments that stress a cut: every kind of whitespace (ASCII, Unicode, the SentencePiece space mark, U+001C which
# Python calls whitespace and Unicode does not), runs of spaces (GPT-NeoX added tokens), combining marks and
# characters NFC composes or decomposes, a compatibility character, contractions, digits, an added token and its
# first characters, CJK, emoji.
FRAGMENTS = [" ", "  ", "     ", "\n", "\n\n", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2000", "\u2028",
             "\u3000", "\u2581", "\u0301", "e\u0301", "\xe9", "A\u030a", "\u1100\u1161", "\xa8", "\ufb01", "'s", "'",
             "s", "re", "ll", "a", "Z", "word", "7", "42", ".", "...", ",", "<|endoftext|>", "<|", "\u65e5\u672c",
             "\U0001f642", "-", "_"]


def _adversarial(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(n))


@pytest.fixture(scope="module")
def books(shared_data: Path) -> list[str]:
    paths = sorted((shared_data / "books").glob("*.txt"))
    if not paths:
        pytest.skip(f"no books in {shared_data / 'books'}")
    return [p.read_text(encoding="utf-8") for p in paths]


@pytest.fixture(scope="module")
def neox(neox_tokenizer_dir: Path) -> HFTokenizer:
    return load_tokenizer(neox_tokenizer_dir)


@pytest.fixture(scope="module")
def sp_books(books: list[str], tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    """What `python -m data_prep --source folder:books` trains by default (BPE, 8192)."""
    return train_sentencepiece(books, tmp_path_factory.mktemp("sp"), vocab_size=8192, num_threads=2)


@pytest.fixture(params=["neox", "sp_books"])
def tok(request):
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_every_book_encodes_exactly_as_whole_documents(tok, books: list[str]) -> None:
    ids, lengths = BulkEncoder(tok).encode(books)
    whole = tok.encode_batch(books)  # each book in one piece, as the library encodes it
    assert lengths.tolist() == [len(w) for w in whole]
    np.testing.assert_array_equal(ids, np.concatenate([np.asarray(w, dtype=np.int64) for w in whole]))
    assert len(tok.cut_pattern.split(books[-1])) > 100_000  # the books really are cut (about a piece per word)


def test_every_cut_of_adversarial_text_keeps_the_ids(tok) -> None:
    rng = random.Random(0)
    n_cuts = 0
    for _ in range(1000):
        text = _adversarial(rng, rng.randint(1, 25))
        whole = tok.encode(text)
        for cut in tok.cut_pattern.finditer(text):
            i = cut.start()
            assert tok.encode(text[:i]) + tok.encode(text[i:]) == whole, (text, i)
            n_cuts += 1
        pieces = tok.cut_pattern.split(text)
        assert "".join(pieces) == text
        assert [i for ids in tok.encode_batch(pieces) for i in ids] == whole, text
    assert n_cuts > 1000


def test_places_the_rule_leaves_alone_would_change_the_ids(neox, sp_books) -> None:
    """The check above can fail: cutting after a whitespace run, inside a run of spaces or after a word's
    leading space changes the ids, and the rule cuts at none of these places."""
    cases = [(neox, "a\n\nb", 3), (neox, "Hello  world", 6), (neox, "Hello world", 6), (neox, "a \n\nb", 2),
             (sp_books, "Hello world", 6), (sp_books, "said he", 5)]
    for tok, text, i in cases:
        assert i not in [m.start() for m in tok.cut_pattern.finditer(text)]
        assert tok.encode(text[:i]) + tok.encode(text[i:]) != tok.encode(text), (text, i)


def test_canonical_normalisation_never_creates_whitespace() -> None:
    """The premise that lets NFC/NFD tokenizers be cut (and why NFKC/NFKD ones are not): no non-whitespace
    code point normalises to text holding whitespace under NFC/NFD; under NFKC some do."""
    changed = [chr(c) for c in range(sys.maxunicode + 1)
               if not 0xD800 <= c <= 0xDFFF and unicodedata.decomposition(chr(c)) and not chr(c).isspace()]
    assert len(changed) > 5000
    for form in ("NFC", "NFD"):
        assert not [c for c in changed if any(x.isspace() for x in unicodedata.normalize(form, c))], form
    assert any(x.isspace() for x in unicodedata.normalize("NFKC", "\xa8"))


def test_unproven_hf_configurations_are_not_cut(neox) -> None:
    base = json.loads(neox._tok.to_str())
    base["model"] = {"type": "BPE", "dropout": None}  # the rule reads no vocabulary or merges

    def cut(change) -> re.Pattern | None:
        config = copy.deepcopy(base)
        change(config)
        return _byte_level_cut_pattern(config, lambda text: unicodedata.normalize("NFC", text))

    def token(**fields):
        return lambda c: c["added_tokens"].append({"id": 50277, "content": "x", "single_word": False, "lstrip": False,
                                                   "rstrip": False, "normalized": False, "special": True, **fields})
    refused = {
        "prefix space": lambda c: c["pre_tokenizer"].update(add_prefix_space=True),
        "no regex": lambda c: c["pre_tokenizer"].update(use_regex=False),
        "NFKC": lambda c: c.update(normalizer={"type": "NFKC"}),
        "lowercase": lambda c: c.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"},
                                                                                        {"type": "Lowercase"}]}),
        "whitespace pre-tokenizer": lambda c: c.update(pre_tokenizer={"type": "Whitespace"}),
        "dropout": lambda c: c["model"].update(dropout=0.1),
        "truncation": lambda c: c.update(truncation={"max_length": 8}),
        "rstrip token": token(rstrip=True),
        "lstrip token": token(lstrip=True),
        "token spanning a word and a space": token(content="end of"),
        "token spanning a word and a newline": token(content="x\n", normalized=True),
    }
    assert cut(lambda c: None).pattern == neox.cut_pattern.pattern
    for what, change in refused.items():
        assert cut(change) is None, what
    assert cut(lambda c: c.update(normalizer={"type": "NFD"})) is not None
    assert cut(lambda c: c.update(normalizer=None)) is not None  # GPT-2 itself
    assert cut(token(content="  ")) is not None  # whitespace-only tokens (GPT-NeoX's runs of spaces) are fine


def _sp_variant(sp: SentencePieceTokenizer, change) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(sp._model_bytes)
    change(model, sp_pb2)
    return model.SerializeToString()


def test_unproven_sentencepiece_models_are_not_cut(sp_books) -> None:
    refused = {
        "unigram": lambda m, pb: setattr(m.trainer_spec, "model_type", pb.TrainerSpec.UNIGRAM),
        "dummy prefix": lambda m, pb: setattr(m.normalizer_spec, "add_dummy_prefix", True),
        "whitespace folding": lambda m, pb: setattr(m.normalizer_spec, "remove_extra_whitespaces", True),
        "custom normaliser": lambda m, pb: setattr(m.normalizer_spec, "precompiled_charsmap", b"\x01"),
        "whitespace as suffix": lambda m, pb: setattr(m.trainer_spec, "treat_whitespace_as_suffix", True),
    }
    for name, change in refused.items():
        assert _sentencepiece_cut_pattern(_sp_variant(sp_books, change)) is None, name
    # a piece joining a word to the next word's space mark: spaces are no longer a barrier, newlines still are
    joined = _sentencepiece_cut_pattern(_sp_variant(sp_books, lambda m, pb: setattr(m.pieces[-1], "piece", "e\u2581t")))
    assert [m.start() for m in joined.finditer("a b\nc d")] == [3]
    assert [m.start() for m in sp_books.cut_pattern.finditer("a b\nc d")] == [1, 3, 5]


def test_bulk_encoder_chunks_and_cache_keep_the_ids(tok, books: list[str]) -> None:
    rng = random.Random(2)
    texts = ["", "x", books[0][:20000]] + [_adversarial(rng, rng.randint(0, 200)) for _ in range(60)] + [""]
    expected = tok.encode_batch(texts)
    flat = np.concatenate([np.asarray(e, dtype=np.int64) for e in expected])
    encoder = BulkEncoder(tok, chunk_chars=300, max_pieces=200)  # many chunks, long texts split, cache restarts
    assert len(list(encoder.iter_encode(texts[2:3]))) > 10
    for _ in range(2):  # the second call starts from the first call's cache
        ids, lengths = encoder.encode(texts)
        assert lengths.tolist() == [len(e) for e in expected]
        np.testing.assert_array_equal(ids, flat)
    ids, lengths = BulkEncoder(tok).encode([])
    assert ids.size == 0 and lengths.size == 0


def test_bulk_encoder_without_cuts_encodes_documents_whole(sp_books, tmp_path: Path) -> None:
    model = tmp_path / "tokenizer.model"
    model.write_bytes(_sp_variant(sp_books, lambda m, pb: setattr(m.trainer_spec, "model_type", pb.TrainerSpec.UNIGRAM)))
    unigram = SentencePieceTokenizer(model)
    assert unigram.cut_pattern is None
    texts = ["\ufb01 \xa8 fine", "", "same", "same", "  spaced  \n\n out " * 5]
    ids, lengths = BulkEncoder(unigram, chunk_chars=4).encode(texts)
    expected = unigram.encode_batch(texts)
    assert lengths.tolist() == [len(e) for e in expected]
    assert ids.tolist() == [i for e in expected for i in e]
    with pytest.raises(ValueError, match="chunk_chars and max_pieces must be >= 1"):
        BulkEncoder(sp_books, chunk_chars=0)


def test_rebuild_with_another_tokenizer_in_the_same_folder_uses_the_new_one(books: list[str], tmp_path: Path) -> None:
    """Shard building keeps its encoder (and piece cache) between shards; a tokenizer replaced in place by
    --overwrite must not be served from that cache."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(books[0][i * 20000:(i + 1) * 20000], encoding="utf-8")
    base = {"out_dir": tmp_path / "out", "source": f"folder:{corpus}", "val_fraction": 0.0}
    build_shards(DataPrepConfig(tokenizer="sentencepiece:400", **base))
    cfg = DataPrepConfig(tokenizer="sentencepiece:500", overwrite=True, **base)
    out = build_shards(cfg)
    tok, shards = load_tokenizer(out / "tokenizer"), TokenShards(out, "train")
    texts = {d.key: d.text for d in cfg.reader()}
    assert tok.vocab_size == 500 and len(shards) == 3
    for i, key in enumerate(shards.doc_keys()):
        assert shards.doc(i).tolist() == tok.encode(texts[key]), key
