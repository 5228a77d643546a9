"""The tokenizer interface: GPT-NeoX ids equal transformers', SentencePiece round-trips Unicode."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from adaptive_mamba.tokenizer import load_tokenizer, train_sentencepiece

README_CASES = {  # from ../shared/data/README.md (llama.cpp reference ids of this tokenizer)
    "Hello world": [12092, 1533],
    " Hello world": [24387, 1533],
    "Hello  world": [12092, 50276, 10186],
    "\n\n": [535],
    "def f(x):\n    return x  # comment\n":
        [1545, 269, 9, 89, 2262, 187, 50274, 2309, 1269, 50276, 4, 4385, 187],
    "<|endoftext|>Hello<|endoftext|>": [0, 12092, 0],
}


def _random_unicode(rng: random.Random, n: int) -> str:
    """Arbitrary code points: ASCII, Latin, CJK, emoji, controls, combining marks (no surrogates)."""
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xC0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF),
             (0x1F300, 0x1FAFF), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        cp = rng.randint(lo, hi)
        out.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
    return "".join(out)


@pytest.fixture(scope="module")
def neox(neox_tokenizer_dir: Path):
    return load_tokenizer(neox_tokenizer_dir)


@pytest.fixture(scope="module")
def auto_neox(neox_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(neox_tokenizer_dir))


def test_neox_properties_and_reference_ids(neox) -> None:
    assert neox.vocab_size == 50277
    assert neox.eos_id == 0  # <|endoftext|>
    for text, ids in README_CASES.items():
        assert neox.encode(text) == ids, text
        assert neox.decode(ids) == text


def test_neox_matches_autotokenizer_on_real_text(neox, auto_neox, shared_data: Path) -> None:
    wiki = (shared_data / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    emma = (shared_data / "books" / "austen_emma.txt").read_text(encoding="utf-8")
    rng = random.Random(0)
    texts = [wiki[i * 20000:(i + 1) * 20000] for i in range(10)]
    texts += [emma[:50000], _random_unicode(rng, 3000), "  leading\tand trailing  \n\n\n   "]
    ours = neox.encode_batch(texts)
    for text, ids in zip(texts, ours):
        assert ids == neox.encode(text)
        assert ids == auto_neox.encode(text, add_special_tokens=False)
    assert sum(map(len, ours)) > 20000


def test_save_and_reload_keeps_ids_and_specials(neox, auto_neox, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    neox.save(model_dir)
    again = load_tokenizer(model_dir)
    assert (again.vocab_size, again.eos_id, again.pad_id, again.name) == \
        (neox.vocab_size, neox.eos_id, neox.pad_id, neox.name)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(model_dir))  # still a valid HF folder
    text = "The saved tokenizer: 日本語, emoji 🙂, spaces   here."
    assert again.encode(text) == neox.encode(text) == reloaded.encode(text, add_special_tokens=False)
    assert load_tokenizer(model_dir / "tokenizer.json").encode(text) == neox.encode(text)


@pytest.fixture(scope="module")
def sp_books(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    books = sorted((shared_data / "books").glob("austen_*.txt"))[:2]
    texts = [p.read_text(encoding="utf-8") for p in books]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("sp"), vocab_size=2000, num_threads=2)


def test_sentencepiece_round_trips_arbitrary_unicode(sp_books) -> None:
    rng = random.Random(1)
    texts = [_random_unicode(rng, rng.randint(1, 400)) for _ in range(50)]
    texts += ["  two spaces,\ttab\r\nCRLF\n\n", "\x00\x01 control", "ﬁ ligature, Å, e\u0301"]
    for text, ids in zip(texts, sp_books.encode_batch(texts)):
        assert 0 not in ids  # never <unk>: byte fallback covers every character
        assert max(ids) < sp_books.vocab_size
        assert sp_books.decode(ids) == text


def test_sentencepiece_compresses_and_reloads(sp_books, shared_data: Path, tmp_path: Path) -> None:
    text = (shared_data / "books" / "austen_pride_and_prejudice.txt").read_text()[:100000]
    ids = sp_books.encode(text)
    assert len(text) / len(ids) > 2.5  # learned merges, not bytes
    assert sp_books.decode(ids) == text
    # a window cut out of the middle decodes to exactly its own text (no dummy prefix)
    assert sp_books.decode(ids[1000:2000]) + sp_books.decode(ids[2000:]) == sp_books.decode(ids[1000:])
    again = load_tokenizer(sp_books.save(tmp_path / "saved"))
    assert (again.vocab_size, again.eos_id, again.pad_id) == (2000, 2, 3)
    assert again.encode(text) == ids


def test_unigram_round_trip(shared_data: Path, tmp_path: Path) -> None:
    text = (shared_data / "books" / "austen_northanger_abbey.txt").read_text()
    tok = train_sentencepiece([text], tmp_path, vocab_size=1000, model_type="unigram")
    sample = text[:5000] + " ΔΣ 😀 \u2028"
    assert tok.decode(tok.encode(sample)) == sample


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(["abc"], tmp_path / "sp", vocab_size=100)
    with pytest.raises(ValueError, match="bpe' or 'unigram"):
        train_sentencepiece(["abc"], tmp_path / "sp", vocab_size=1000, model_type="wordpiece")
