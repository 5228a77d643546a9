"""Build packed token shards from a corpus (`python -m data_prep --help`).

Examples:
    python -m data_prep --out runs/data/stdlib                        # stdlib .py files, SP 8192
    python -m data_prep --source folder:../shared/data/books \\
        --tokenizer hf:../shared/data/tokenizers/gpt-neox-20b --out runs/data/books
    python -m data_prep --source hf:pg19 --hf-split train --tokenizer hf:EleutherAI/gpt-neox-20b \\
        --workers 8 --out runs/data/pg19
Re-running the same command resumes an interrupted build and skips finished shards.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from adaptive_mamba.data import DataPrepConfig, TokenShards, build_shards


def _number(kind: type, low: float, low_open: bool = False, high: float | None = None):
    """An argparse type: a `kind` number >= low (> low when low_open), < high when given; errors name the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value < low or (low_open and value == low) or (high is not None and value >= high):
            bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is invalid: it must be {bound}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--source", default="stdlib",
                     help="stdlib | folder:PATH (.txt/.jsonl/.parquet, or one such file) | hf:NAME "
                          "(default: stdlib, this Python's standard library source files)")
    src.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/HF rows")
    src.add_argument("--hf-config", default=None, help="HF dataset config, e.g. wikitext-103-raw-v1")
    src.add_argument("--hf-split", default="train", help="HF dataset split (default: train)")
    src.add_argument("--articles", choices=["auto", "none", "wikitext"], default="auto",
                     help="split WikiText-format text into articles (auto: HF wikitext datasets)")
    src.add_argument("--max-docs", type=_number(int, 1), default=None, help="stop after this many documents")
    src.add_argument("--max-mb", type=_number(float, 0, low_open=True), default=None, help="stop after this much text (MB)")
    src.add_argument("--on-decode-error", choices=["skip", "error"], default="skip",
                     help="non-UTF-8 inputs: skip and count them (default) or stop with an error")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default="sentencepiece:8192",
                     help="sentencepiece:VOCAB (train on the training split) | hf:PATH_OR_REPO "
                          "(default: sentencepiece:8192)")
    tok.add_argument("--sp-model-type", choices=["bpe", "unigram"], default="bpe")
    tok.add_argument("--sp-max-train-mb", type=_number(float, 0, low_open=True), default=200.0,
                     help="text used to train SentencePiece (MB, first documents of train)")
    out = p.add_argument_group("shards")
    out.add_argument("--out", required=True, type=Path, help="output folder")
    out.add_argument("--val-fraction", type=_number(float, 0, high=1), default=0.05,
                     help="fraction of documents held out for validation (default 0.05)")
    out.add_argument("--shard-mb", type=_number(float, 0, low_open=True), default=64.0, help="text per shard (MB)")
    out.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    out.add_argument("--workers", type=_number(int, 1), default=1, help="tokenizer worker processes")
    out.add_argument("--seed", type=_number(int, 0), default=0, help="seed of the train/val split")
    out.add_argument("--overwrite", action="store_true",
                     help="replace shards in --out built from a different corpus/config")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DataPrepConfig:
    max_bytes = None if args.max_mb is None else int(args.max_mb * (1 << 20))
    return DataPrepConfig(
        out_dir=args.out, source=args.source, tokenizer=args.tokenizer, text_field=args.text_field,
        hf_config=args.hf_config, hf_split=args.hf_split, articles=args.articles,
        max_docs=args.max_docs, max_bytes=max_bytes, on_decode_error=args.on_decode_error,
        val_fraction=args.val_fraction, shard_size_mb=args.shard_mb, token_dtype=args.dtype,
        num_workers=args.workers, seed=args.seed, sp_model_type=args.sp_model_type,
        sp_max_train_mb=args.sp_max_train_mb, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        out = build_shards(config_from_args(args))
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = json.loads((out / "metadata.json").read_text())
    summary = {split: {"docs": len(TokenShards(out, split)), "tokens": s["n_tokens"],
                       "shards": len(s["shards"])} for split, s in meta["splits"].items()}
    print(json.dumps({"out": str(out), "tokenizer": meta["tokenizer"]["name"],
                      "vocab_size": meta["tokenizer"]["vocab_size"], "dtype": meta["dtype"],
                      "skipped": meta["skipped"], "splits": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
