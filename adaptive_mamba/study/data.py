"""The study's data and its cached base model, both content-addressed.

Corpora are lists of text files. Each is cut into pieces of about `piece_kb` at blank lines (one book
is one document, and a held-out validation split needs several), tokenised once into shards, and
stored under `CACHE/data/NAME-HASH`. Both regimes use the tokenizer trained on the pre-training
corpus, so the base model and its fine-tuning data agree on ids. The base model for the fine-tuning
regime is trained once per (config, data) and stored under `CACHE/base/HASH`: a second study with
the same settings reuses it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from adaptive_mamba.data import DataPrepConfig, build_shards
from adaptive_mamba.fileio import file_sha256

DONE = "DONE"


def stdlib_corpora() -> tuple[list[Path], list[Path]]:
    """(pre-training, fine-tuning) corpora every Python install has: the standard library's modules, and its
    test suite."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)
    tests = [p for p in files if "test" in p.parts or p.name.startswith("test_")]
    modules = [p for p in files if p not in set(tests)]
    if not modules or not tests:
        raise FileNotFoundError(f"no standard-library sources found under {lib}")
    return modules, tests


def _fingerprint(files: Sequence[Path], extra: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for f in files:
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return h.hexdigest()[:16]


def split_pieces(text: str, piece_bytes: int) -> list[str]:
    """Consecutive pieces of at least `piece_bytes` (the last may be shorter), cut at blank lines."""
    pieces, current, size = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= piece_bytes:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current and "".join(current).strip():
        pieces.append("\n\n".join(current))
    return pieces


def write_corpus(files: Sequence[Path], out: Path, piece_kb: int, max_mb: Optional[float]) -> Path:
    """`files` as a folder of .txt pieces (at most `max_mb` of text in all)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    budget = None if max_mb is None else int(max_mb * 2 ** 20)
    used, n = 0, 0
    for f in files:
        for piece in split_pieces(f.read_text(errors="replace"), piece_kb * 1024):
            (tmp / f"{n:06d}.txt").write_text(piece)
            n, used = n + 1, used + len(piece)
            if budget is not None and used >= budget:
                break
        if budget is not None and used >= budget:
            break
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare_shards(name: str, files: Sequence[Path], cache: Path, tokenizer: str, piece_kb: int,
                   max_mb: Optional[float], val_fraction: float) -> Path:
    """Token shards of a corpus under CACHE/data/NAME-HASH (built once)."""
    if not files:
        raise ValueError(f"the {name} corpus has no text files")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{name} corpus file(s) not found: {', '.join(missing)}")
    tok_files = [Path(tokenizer) / "tokenizer.model"] if Path(tokenizer).is_dir() else []
    key = _fingerprint(list(files) + tok_files, {"tokenizer": tokenizer if not tok_files else
                                                  file_sha256(tok_files[0]), "piece_kb": piece_kb,
                                                  "max_mb": max_mb, "val_fraction": val_fraction})
    out = cache / "data" / f"{name}-{key}"
    if (out / DONE).is_file():
        return out
    text_dir = write_corpus(files, cache / "corpora" / f"{name}-{key}", piece_kb, max_mb)
    build_shards(DataPrepConfig(out_dir=out, source=f"folder:{text_dir}", tokenizer=tokenizer,
                                val_fraction=val_fraction, overwrite=True))
    (out / DONE).write_text("")
    return out


def cached_base_model(cache: Path, config: Mapping[str, Any], data_dir: Path,
                      train: Callable[[Path, dict[str, Any]], None]) -> Path:
    """The exported merged base model for `config` on `data_dir`, trained by `train(output_dir, config)` the first
    time and reused afterwards (the address hashes the config and the data's metadata)."""
    meta = (data_dir / "metadata.json").read_text()
    key = hashlib.sha256(json.dumps({"config": config, "data": meta}, sort_keys=True, default=str).encode())
    out = cache / "base" / key.hexdigest()[:16]
    model = out / "export" / "merged"
    if (out / DONE).is_file():
        return model
    out.mkdir(parents=True, exist_ok=True)
    train(out, {**config, "train.output_dir": str(out), "data.dir": str(data_dir), "train.export_at_end": True})
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"the base-model run in {out} finished without an export in {model}")
    (out / DONE).write_text("")
    return model


def text_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, and the .txt files inside folders named."""
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(p.glob("*.txt")) if p.is_dir() else [p])
    return out
