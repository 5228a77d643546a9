"""Document readers: one `Document` per book / article / file, in a deterministic order.

Sources (the `source` string of `DataPrepConfig`):
  - ``stdlib``: the `.py` files of this Python's standard library (found through `sysconfig`),
    the embedded default corpus every install has; test folders and site-packages are left out.
  - ``folder:PATH``: `.txt`/`.raw` files (one document each), `.jsonl` (one document per line,
    text in `text_field`) and `.parquet` (one document per row) under PATH, recursively, sorted by
    path. PATH may also be a single file (read as plain text unless it is .jsonl/.parquet).
  - ``hf:NAME``: a Hugging Face dataset (`datasets.load_dataset(NAME, hf_config, split=hf_split)`),
    one document per row, text in `text_field`; works offline from the local cache.

`articles="wikitext"` splits WikiText-format text into its articles (a top-level heading
`` = Title = `` starts one); HF wikitext datasets, which store one *line* per row, are regrouped
into articles the same way. Reading never splits a document otherwise.

Bad input is counted, not hidden: empty documents and undecodable (non-UTF-8) files or lines are
skipped and tallied in `SkipStats` (or raise, with ``on_decode_error="error"``).
"""
from __future__ import annotations

import json
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

_WIKITEXT_TITLE = re.compile(r" = [^=].* = \n")
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
FOLDER_SUFFIXES = (".txt", ".raw", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    key: str  # stable id, e.g. "austen_emma.txt", "data.jsonl:17", "wikitext/test:row42"
    text: str


@dataclass
class SkipStats:
    """What the readers left out, with a few example keys for the error/warning message."""

    empty: int = 0
    non_utf8: int = 0
    bad_json: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, kind: str, key: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {key}")

    def total(self) -> int:
        return self.empty + self.non_utf8 + self.bad_json

    def as_dict(self) -> dict:
        return {"empty": self.empty, "non_utf8": self.non_utf8, "bad_json": self.bad_json,
                "examples": list(self.examples)}


def split_wikitext_articles(text: str) -> list[str]:
    """Split WikiText text into articles; "".join(result) == text."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for i, line in enumerate(lines):
        if i > 0 and _WIKITEXT_TITLE.fullmatch(line):
            start = i - 1 if lines[i - 1].strip() == "" else i
            if start > starts[-1]:
                starts.append(start)
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files, sorted, without tests and site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library not found at {root}")
    return sorted(p for p in root.rglob("*.py")
                  if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


class DocumentReader:
    """Iterates the documents of one source; re-iterable, same order every time."""

    def __init__(self, source: str, text_field: str = "text", hf_config: str | None = None,
                 hf_split: str = "train", articles: str = "auto", on_decode_error: str = "skip",
                 max_docs: int | None = None, max_bytes: int | None = None) -> None:
        if on_decode_error not in ("skip", "error"):
            raise ValueError(f"on_decode_error must be 'skip' or 'error', got {on_decode_error!r}")
        if articles not in ("auto", "none", "wikitext"):
            raise ValueError(f"articles must be 'auto', 'none' or 'wikitext', got {articles!r}")
        self.source = source
        self.text_field = text_field
        self.hf_config = hf_config
        self.hf_split = hf_split
        self.on_decode_error = on_decode_error
        self.max_docs = max_docs
        self.max_bytes = max_bytes
        kind, _, arg = source.partition(":")
        if kind not in ("stdlib", "folder", "hf") or (kind != "stdlib" and not arg):
            raise ValueError(f"unknown source {source!r}; use 'stdlib', 'folder:PATH' or 'hf:NAME'")
        self.kind, self.arg = kind, arg
        self.wikitext = articles == "wikitext" or (
            articles == "auto" and kind == "hf" and "wikitext" in arg.lower())
        self.skipped = SkipStats()
        if kind == "folder":
            self._files = self._folder_files(Path(arg))

    @staticmethod
    def _folder_files(path: Path) -> list[tuple[Path, str]]:
        if not path.exists():
            raise FileNotFoundError(f"data folder {path} does not exist; check --source folder:PATH")
        if path.is_file():
            return [(path, path.name)]
        files = sorted(p for p in path.rglob("*") if p.suffix in FOLDER_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt, .raw, .jsonl or .parquet files under {path}")
        return [(p, p.relative_to(path).as_posix()) for p in files]

    def __iter__(self) -> Iterator[Document]:
        """Documents in order, after skipping bad/empty ones and applying max_docs/max_bytes."""
        self.skipped = SkipStats()
        n_docs = n_bytes = 0
        for doc in self._raw_documents():
            if not doc.text.strip():
                self.skipped.skip("empty", doc.key)
                continue
            size = len(doc.text.encode("utf-8"))
            if self.max_docs is not None and n_docs >= self.max_docs:
                return
            if self.max_bytes is not None and n_docs > 0 and n_bytes + size > self.max_bytes:
                return
            n_docs += 1
            n_bytes += size
            yield doc

    def _raw_documents(self) -> Iterator[Document]:
        if self.kind == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            for path in stdlib_files(root):
                yield from self._text_file(path, path.relative_to(root).as_posix())
        elif self.kind == "folder":
            for path, key in self._files:
                if path.suffix == ".jsonl":
                    yield from self._jsonl_file(path, key)
                elif path.suffix == ".parquet":
                    yield from self._parquet_file(path, key)
                else:
                    yield from self._text_file(path, key)
        else:
            yield from self._hf_dataset()

    def _decode(self, raw: bytes, key: str) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.on_decode_error == "error":
                raise ValueError(f"{key} is not valid UTF-8 ({err}); fix or remove it, or pass "
                                 "on_decode_error='skip' to skip such inputs") from err
            self.skipped.skip("non_utf8", key)
            return None

    def _with_articles(self, text: str, key: str) -> Iterator[Document]:
        if not self.wikitext:
            yield Document(key, text)
            return
        for i, article in enumerate(split_wikitext_articles(text)):
            yield Document(f"{key}#a{i}", article)

    def _text_file(self, path: Path, key: str) -> Iterator[Document]:
        text = self._decode(path.read_bytes(), key)
        if text is not None:
            yield from self._with_articles(text, key)

    def _field(self, record: dict, key: str) -> object:
        if self.text_field not in record:
            raise KeyError(f"{key} has no field {self.text_field!r} (fields: {sorted(record)}); "
                           "pass the right text field (--text-field)")
        return record[self.text_field]

    def _jsonl_file(self, path: Path, key: str) -> Iterator[Document]:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                line_key = f"{key}:{line_no}"
                line = self._decode(raw, line_key)
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.skipped.skip("bad_json", line_key)
                    continue
                text = self._field(record, line_key) if isinstance(record, dict) else None
                yield Document(line_key, text if isinstance(text, str) else "")

    def _parquet_file(self, path: Path, key: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if self.text_field not in pf.schema_arrow.names:
            raise KeyError(f"{key} has no column {self.text_field!r} (columns: "
                           f"{pf.schema_arrow.names}); pass the right text field (--text-field)")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield Document(f"{key}:{row}", text if isinstance(text, str) else "")
                row += 1

    def _hf_dataset(self) -> Iterator[Document]:
        import datasets

        try:
            ds = datasets.load_dataset(self.arg, self.hf_config, split=self.hf_split)
        except Exception as err:  # offline without a cache, unknown name/config/split, ...
            raise RuntimeError(
                f"could not load Hugging Face dataset {self.arg!r} (config={self.hf_config!r}, "
                f"split={self.hf_split!r}): {err}. Without hub access it must be in the local "
                "datasets cache; or save it as .jsonl/.parquet and use --source folder:PATH"
            ) from err
        if self.text_field not in ds.column_names:
            raise KeyError(f"dataset {self.arg} has no column {self.text_field!r} (columns: "
                           f"{ds.column_names}); pass --text-field")
        prefix = f"{self.arg}/{self.hf_split}"
        column = ds.select_columns([self.text_field])
        if self.wikitext:  # rows are lines: regroup them into articles
            text = "".join(t or "" for batch in column.iter(batch_size=4096)
                           for t in batch[self.text_field])
            yield from self._with_articles(text, prefix)
            return
        row = 0
        for batch in column.iter(batch_size=256):
            for text in batch[self.text_field]:
                yield Document(f"{prefix}:row{row}", text if isinstance(text, str) else "")
                row += 1
