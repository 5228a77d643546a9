"""Tokenisation throughput: ours vs `datasets.map` (what a user would write), on the same books, checking the ids.

For each tokenizer kind, the GPT-NeoX `tokenizer.json` and SentencePiece BPE 8192 trained on the books (what
`python -m data_prep --tokenizer sentencepiece:8192` trains; trained once here, not timed), times:

  datasets.map   Dataset.from_dict({"text": books}).map(tokenize, batched=True, num_proc=2), kept in memory
  BulkEncoder    our encoder alone, in memory (the same work as the row above)
  build_shards   end to end: scan and hash the inputs, tokenise, write and hash memory-mappable shards

and prints the wall time (fastest of --repeat runs), MB/s of text, the ratio to datasets.map, the CPU time of that
run (all threads and worker processes: the work done, which a loaded machine distorts less than the wall time),
and whether every book's ids equal datasets.map's.

    .venv/bin/python bench/bench_tokenize.py [--books ../shared/data/books] [--repeat 3]
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes (datasets' workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best_of(repeat: int, run: Callable[[], list[np.ndarray]]) -> tuple[float, float, list[np.ndarray]]:
    """(wall seconds, CPU seconds) of the fastest of `repeat` runs, and the ids (one array per book) of the last."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), cpu_seconds()
        ids = run()
        best = min(best, (time.perf_counter() - t0, cpu_seconds() - c0))
    return *best, ids


def datasets_map(texts: list[str], tokenize: Callable[[dict], dict]) -> list[np.ndarray]:
    import datasets

    out = datasets.Dataset.from_dict({"text": texts}).map(
        tokenize, batched=True, num_proc=2, remove_columns=["text"], load_from_cache_file=False, keep_in_memory=True)
    return [np.asarray(ids) for ids in out["input_ids"]]


def bulk_encoder(texts: list[str], tok) -> list[np.ndarray]:
    from adaptive_mamba.data.bulk_encode import BulkEncoder

    ids, lengths = BulkEncoder(tok).encode(texts)  # a new encoder: its cache of distinct pieces starts empty
    return np.split(ids, np.cumsum(lengths)[:-1])


def build_shards(books: Path, tok_dir: Path) -> list[np.ndarray]:
    from adaptive_mamba.data import DataPrepConfig, TokenShards
    from adaptive_mamba.data import build_shards as build

    with tempfile.TemporaryDirectory() as tmp:
        build(DataPrepConfig(out_dir=tmp, source=f"folder:{books}", tokenizer=str(tok_dir), val_fraction=0.0))
        shards = TokenShards(tmp, "train")
        order = np.argsort(shards.doc_keys())  # the books in file-name order, as read for the other routes
        return [np.array(shards.doc(int(i))) for i in order]


def hf_map_function(tok_dir: Path) -> Callable[[dict], dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return lambda batch: tok(batch["text"])


def sp_map_function(tok_dir: Path) -> Callable[[dict], dict]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    return lambda batch: {"input_ids": sp.encode(batch["text"], out_type=int)}


def compare(texts: list[str], books: Path, tok_dir: Path, tokenize: Callable[[dict], dict], repeat: int) -> None:
    """Print the table rows of one tokenizer."""
    from adaptive_mamba.tokenizer import load_tokenizer

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = load_tokenizer(tok_dir)  # loaded once, outside the timings, like `tokenize`'s tokenizer
    base, base_cpu, expected = best_of(repeat, lambda: datasets_map(texts, tokenize))
    print(f"{'route':<44} {'wall':>9} {'text':>11} {'ratio':>6} {'CPU':>8}")
    print(f"{'datasets.map(batched=True, num_proc=2)':<44} {base:7.2f} s {mb / base:6.2f} MB/s {1:5.2f}x {base_cpu:6.2f} s")
    for route, run in [("BulkEncoder (tokenise, in memory)", lambda: bulk_encoder(texts, tok)),
                       ("build_shards (scan, tokenise, write shards)", lambda: build_shards(books, tok_dir))]:
        seconds, cpu, ids = best_of(repeat, run)
        same = len(ids) == len(expected) and all(np.array_equal(a, b) for a, b in zip(ids, expected))
        print(f"{route:<44} {seconds:7.2f} s {mb / seconds:6.2f} MB/s {base / seconds:5.2f}x {cpu:6.2f} s  "
              f"ids {'equal' if same else 'DIFFER'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--books", type=Path, default=REPO.parent / "shared" / "data" / "books")
    p.add_argument("--tokenizer", type=Path,
                   default=REPO.parent / "shared" / "data" / "tokenizers" / "gpt-neox-20b")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")  # build_shards' progress bars would interleave with the table
    import datasets

    from adaptive_mamba.tokenizer import train_sentencepiece

    datasets.disable_progress_bars()
    paths = sorted(args.books.glob("*.txt"))
    texts = [f.read_text(encoding="utf-8") for f in paths]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {mb:.2f} MB of text in {args.books}")
    with tempfile.TemporaryDirectory() as tmp:
        sp_dir = Path(tmp) / "sp"
        train_sentencepiece(texts, sp_dir, vocab_size=8192, num_threads=2)
        for name, tok_dir, map_function in [(args.tokenizer.name, args.tokenizer, hf_map_function),
                                            ("SentencePiece BPE 8192 (trained on the books)", sp_dir, sp_map_function)]:
            print(f"\ntokenizer: {name}")
            compare(texts, args.books, tok_dir, map_function(tok_dir), args.repeat)


if __name__ == "__main__":
    main()
