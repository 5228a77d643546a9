"""Shards from real corpora: exact token counts, round trips, boundaries, resume, bad input, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adaptive_mamba.data import DataPrepConfig, TokenShards, build_shards, split_wikitext_articles
from adaptive_mamba.data.sources import DocumentReader
from adaptive_mamba.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _docs_by_key(cfg: DataPrepConfig) -> dict[str, str]:
    return {d.key: d.text for d in cfg.reader()}


def _check_shards_against_source(out: Path, cfg: DataPrepConfig) -> None:
    """Every document's tokens are exactly tok.encode(text), where the index says, and decode back."""
    tok = load_tokenizer(out / "tokenizer")
    texts = _docs_by_key(cfg)
    meta = json.loads((out / "metadata.json").read_text())
    seen = []
    for split in ("train", "val"):
        shards = TokenShards(out, split)
        keys = shards.doc_keys()
        assert len(keys) == len(shards) == meta["splits"][split]["n_docs"]
        assert shards.num_tokens == meta["splits"][split]["n_tokens"]
        expected = tok.encode_batch([texts[k] for k in keys])
        assert sum(map(len, expected)) == shards.num_tokens
        for i, (key, ids) in enumerate(zip(keys, expected)):
            assert shards.doc(i).tolist() == ids, key
            assert tok.decode(shards.doc(i)) == texts[key]
        seen += keys
    assert sorted(seen) == sorted(texts)  # the split is a partition of the documents
    assert meta["n_tokens"] == sum(s["n_tokens"] for s in meta["splits"].values())


@pytest.fixture(scope="module")
def books_cfg(shared_data: Path, neox_tokenizer_dir: Path, tmp_path_factory) -> DataPrepConfig:
    return DataPrepConfig(out_dir=tmp_path_factory.mktemp("books"), source=f"folder:{shared_data / 'books'}",
                          tokenizer=f"hf:{neox_tokenizer_dir}", shard_size_mb=1.0, val_fraction=0.3)


@pytest.fixture(scope="module")
def books_out(books_cfg: DataPrepConfig) -> Path:
    return build_shards(books_cfg)


def test_books_shards_are_exact(books_out: Path, books_cfg: DataPrepConfig) -> None:
    meta = json.loads((books_out / "metadata.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 50277
    assert len(meta["splits"]["train"]["shards"]) >= 2  # multi-shard
    assert meta["splits"]["val"]["n_docs"] == 2  # round(0.3 * 6)
    assert len(meta["input_sha256"]) == 64
    _check_shards_against_source(books_out, books_cfg)
    assert (books_out / "tokenizer" / "tokenizer.json").is_file()


def test_rerun_is_idempotent_and_resume_rebuilds_only_missing(books_out: Path,
                                                              books_cfg: DataPrepConfig) -> None:
    meta = json.loads((books_out / "metadata.json").read_text())
    bins = sorted((books_out / "train").glob("*.bin"))
    mtimes = {p: p.stat().st_mtime_ns for p in bins}
    build_shards(books_cfg)
    assert {p: p.stat().st_mtime_ns for p in bins} == mtimes  # nothing re-tokenised
    # simulate a crash in the middle of shard 1: marker missing, .bin truncated
    victim = bins[1]
    victim.with_name(victim.name.replace(".bin", ".json")).unlink()
    victim.write_bytes(victim.read_bytes()[:100])
    build_shards(books_cfg)
    assert json.loads((books_out / "metadata.json").read_text()) == meta
    assert {p: p.stat().st_mtime_ns for p in bins if p != victim} == \
        {p: t for p, t in mtimes.items() if p != victim}


def test_other_config_in_same_out_dir_is_refused(books_out: Path, books_cfg: DataPrepConfig) -> None:
    other = DataPrepConfig(**{**books_cfg.__dict__, "val_fraction": 0.5})
    with pytest.raises(FileExistsError, match="different corpus or config"):
        build_shards(other)


def test_truncated_shard_is_detected_by_reader(books_cfg: DataPrepConfig, tmp_path: Path) -> None:
    cfg = DataPrepConfig(**{**books_cfg.__dict__, "out_dir": tmp_path, "max_docs": 2,
                            "val_fraction": 0.0})
    out = build_shards(cfg)
    shard = next((out / "train").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TokenShards(out, "train")


def test_wikitext_articles(shared_data: Path, neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    raw = shared_data / "wikitext-2" / "wiki.test.raw"
    text = raw.read_text(encoding="utf-8")
    articles = split_wikitext_articles(text)
    assert len(articles) == 62 and "".join(articles) == text
    assert articles[1].startswith(" \n = Du Fu = \n")
    cfg = DataPrepConfig(out_dir=tmp_path, source=f"folder:{raw}", articles="wikitext",
                         tokenizer=f"hf:{neox_tokenizer_dir}", shard_size_mb=0.5, val_fraction=0.1)
    out = build_shards(cfg)
    assert len(TokenShards(out, "train")) + len(TokenShards(out, "val")) == 62
    _check_shards_against_source(out, cfg)


def test_stdlib_sentencepiece_parallel_equals_serial(tmp_path: Path) -> None:
    base = dict(source="stdlib", tokenizer="sentencepiece:600", max_docs=40, shard_size_mb=0.05,
                val_fraction=0.1)
    serial = build_shards(DataPrepConfig(out_dir=tmp_path / "serial", num_workers=1, **base))
    parallel = build_shards(DataPrepConfig(out_dir=tmp_path / "parallel", num_workers=2, **base))
    m1, m2 = (json.loads((d / "metadata.json").read_text()) for d in (serial, parallel))
    assert m1["splits"] == m2["splits"] and m1["n_tokens"] > 0
    assert len(m1["splits"]["train"]["shards"]) >= 3
    tok = load_tokenizer(serial / "tokenizer")
    assert tok.name == "sp-bpe-600" and m1["dtype"] == "uint16"
    _check_shards_against_source(serial, DataPrepConfig(out_dir=serial, **base))


def test_bad_inputs_are_skipped_and_counted(neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("A good document.\n")
    (src / "empty.txt").write_text("")
    (src / "blank.txt").write_text("  \n\n")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (src / "docs.jsonl").write_text('{"text": "first"}\n{oops\n{"text": ""}\n{"text": "third"}\n')
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    cfg = DataPrepConfig(out_dir=tmp_path / "out", source=f"folder:{src}",
                         tokenizer=f"hf:{neox_tokenizer_dir}", val_fraction=0.0)
    out = build_shards(cfg)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["skipped"]["empty"] == 3 and meta["skipped"]["non_utf8"] == 1
    assert meta["skipped"]["bad_json"] == 1
    assert TokenShards(out, "train").doc_keys() == ["a.txt", "docs.jsonl:1", "docs.jsonl:4"]
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8"):
        build_shards(DataPrepConfig(**{**cfg.__dict__, "out_dir": tmp_path / "o2",
                                       "on_decode_error": "error"}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_shards(DataPrepConfig(out_dir=tmp_path / "o3", source=f"folder:{tmp_path / 'nope'}"))
    with pytest.raises(KeyError, match="no field 'body'"):
        build_shards(DataPrepConfig(out_dir=tmp_path / "o4", source=f"folder:{src / 'docs.jsonl'}",
                                    text_field="body", tokenizer=f"hf:{neox_tokenizer_dir}"))
    with pytest.raises(ValueError, match="only 1 document"):
        build_shards(DataPrepConfig(out_dir=tmp_path / "o5", source=f"folder:{src / 'a.txt'}",
                                    tokenizer=f"hf:{neox_tokenizer_dir}", val_fraction=0.5))


def _word_level_tokenizer(directory: Path, n_words: int) -> Path:
    """A real HF tokenizer.json with a vocabulary larger than uint16 can hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return directory


def test_large_vocab_needs_uint32(tmp_path: Path) -> None:
    tok_dir = _word_level_tokenizer(tmp_path / "tok", 70000)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "d.txt").write_text("w1 w69999 w65534 w65535 w70 w65536 w123")
    base = dict(source=f"folder:{tmp_path / 'c'}", tokenizer=f"hf:{tok_dir}", val_fraction=0.0)
    with pytest.raises(ValueError, match="does not fit in uint16"):
        build_shards(DataPrepConfig(out_dir=tmp_path / "o16", token_dtype="uint16", **base))
    assert not list((tmp_path / "o16").glob("train/*.bin"))  # no corrupt shard left behind
    out = build_shards(DataPrepConfig(out_dir=tmp_path / "o32", **base))
    shards = TokenShards(out, "train")
    assert shards.dtype == np.uint32
    assert shards.doc(0).tolist() == [3, 70001, 65536, 65537, 72, 65538, 125]


def test_parquet_source(neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["Row zero text.", "Row one, longer text\nwith two lines.", "Row two."]
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"content": texts, "n": [0, 1, 2]}), tmp_path / "p" / "x.parquet")
    cfg = DataPrepConfig(out_dir=tmp_path / "o", source=f"folder:{tmp_path / 'p'}",
                         text_field="content", tokenizer=f"hf:{neox_tokenizer_dir}", val_fraction=0)
    shards = TokenShards(build_shards(cfg), "train")
    assert shards.doc_keys() == ["x.parquet:0", "x.parquet:1", "x.parquet:2"]
    assert [shards.tokenizer().decode(shards.doc(i)) for i in range(3)] == texts


def test_stdlib_reader_is_deterministic_and_skips_tests() -> None:
    reader = DocumentReader("stdlib", max_docs=30)
    keys = [d.key for d in reader]
    assert keys == [d.key for d in reader] and len(keys) == 30
    assert keys == sorted(keys, key=lambda k: Path(k).parts)  # sorted, not filesystem order
    assert not any("/test/" in k or k.startswith(("test/", "site-packages")) for k in keys)


def test_cli_builds_and_reports_errors(shared_data: Path, neox_tokenizer_dir: Path,
                                       tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "data_prep", "--source",
           f"folder:{shared_data / 'books' / 'austen_northanger_abbey.txt'}",
           "--tokenizer", f"hf:{neox_tokenizer_dir}", "--out", str(tmp_path / "o"),
           "--val-fraction", "0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["splits"]["train"]["docs"] == 1 and summary["splits"]["train"]["tokens"] > 100000
    bad = subprocess.run([sys.executable, "-m", "data_prep", "--source", "folder:/no/such/dir",
                          "--out", str(tmp_path / "o2")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "data folder /no/such/dir does not exist" in bad.stderr
