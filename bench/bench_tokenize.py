"""Tokenisation throughput: `build_shards` vs the plain `datasets.map(tokenizer)` route.

Both tokenise the same books with the same GPT-NeoX tokenizer; ours also scans, hashes, splits and
writes memory-mappable shards. Prints MB/s of text for each and the ratio (ours / datasets.map).

    .venv/bin/python bench/bench_tokenize.py [--books ../shared/data/books] [--repeat 2]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_ours(books: Path, tok_dir: Path, workers: int) -> float:
    from adaptive_mamba.data import DataPrepConfig, build_shards

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataPrepConfig(out_dir=tmp, source=f"folder:{books}", tokenizer=f"hf:{tok_dir}",
                             val_fraction=0.0, num_workers=workers, shard_size_mb=1.0)
        t0 = time.perf_counter()
        build_shards(cfg)
        return time.perf_counter() - t0


def bench_datasets_map(texts: list[str], tok_dir: Path) -> float:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ds = datasets.Dataset.from_dict({"text": texts})
    t0 = time.perf_counter()
    ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"],
           load_from_cache_file=False, keep_in_memory=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--books", type=Path, default=REPO.parent / "shared" / "data" / "books")
    p.add_argument("--tokenizer", type=Path,
                   default=REPO.parent / "shared" / "data" / "tokenizers" / "gpt-neox-20b")
    p.add_argument("--repeat", type=int, default=2, help="best of N runs")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    texts = [f.read_text(encoding="utf-8") for f in sorted(args.books.glob("*.txt"))]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {mb:.2f} MB, tokenizer {args.tokenizer.name}")
    base = min(bench_datasets_map(texts, args.tokenizer) for _ in range(args.repeat))
    print(f"{'datasets.map(tokenizer, batched=True)':<44} {base:7.2f} s  {mb / base:6.2f} MB/s  1.00x")
    for workers in (1, 2):
        ours = min(bench_ours(args.books, args.tokenizer, workers) for _ in range(args.repeat))
        print(f"{f'build_shards (workers={workers}, shards written)':<44} {ours:7.2f} s  "
              f"{mb / ours:6.2f} MB/s  {base / ours:.2f}x")


if __name__ == "__main__":
    main()
