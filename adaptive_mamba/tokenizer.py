"""One small tokenizer interface over Hugging Face `tokenizer.json` files and SentencePiece models.

Training, evaluation, generation and data preparation all go through this module, so a model,
its shards and its evaluation always agree on ids::

    from adaptive_mamba.tokenizer import load_tokenizer, train_sentencepiece
    tok = load_tokenizer("/work/shared/data/tokenizers/gpt-neox-20b")  # or a dir with tokenizer.model
    ids = tok.encode("Hello world")            # [12092, 1533]; never adds special tokens
    tok.decode(ids)                            # "Hello world"
    tok.vocab_size, tok.eos_id, tok.pad_id, tok.name
    tok.save(model_dir)                        # load_tokenizer(model_dir) reads it back

`load_tokenizer(path)` accepts a folder holding `tokenizer.json` (HF fast tokenizer), a folder
holding `tokenizer.model` (SentencePiece), either file itself, a model directory that has the
tokenizer saved next to its weights (also in a `tokenizer/` sub-folder), or a HF folder with only
slow-tokenizer files (converted once through `transformers.AutoTokenizer`).

`tokenizer_info.json`, written by `save`, records the format, name and special ids so that a
saved tokenizer reloads with the same `eos_id`/`pad_id` whatever library version reads it.
"""
from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

INFO_FILE = "tokenizer_info.json"
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Tried in order when a HF folder's config names no eos token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class Tokenizer(ABC):
    """Text <-> ids. `encode` never adds special tokens; `decode` keeps them."""

    name: str
    eos_id: int
    pad_id: int | None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (ids are in [0, vocab_size))."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (uses the library's native batch path)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special tokens are rendered, not skipped)."""

    @property
    @abstractmethod
    def cut_pattern(self) -> re.Pattern | None:
        """A zero-width regex matching places where a text can be cut without changing its ids:
        `encode(a + b) == encode(a) + encode(b)` whenever `len(a)` is a match position in `a + b`.
        None when this tokenizer's configuration is not one whose safe cuts are proven here (documents
        are then encoded whole). `adaptive_mamba.data.bulk_encode` uses it to encode books word by word."""

    @abstractmethod
    def _save_files(self, directory: Path) -> str:
        """Write the library's own files into `directory`; return the format name."""

    @abstractmethod
    def _content(self) -> bytes:
        """The library's canonical serialisation of the vocabulary and rules (independent of file layout)."""

    def content_hash(self) -> str:
        """sha256 of what the tokenizer does (vocabulary, merges/scores, normaliser, special ids): two tokenizers
        with the same vocabulary size but different pieces differ; the same one saved twice does not."""
        h = hashlib.sha256(type(self).__name__.encode() + self._content())
        h.update(json.dumps([self.eos_id, self.pad_id]).encode())
        return h.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write the files `load_tokenizer(directory)` reads back; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fmt = self._save_files(directory)
        info = {"format": fmt, "name": self.name, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id}
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return directory

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (`tokenizers.Tokenizer`, i.e. a `tokenizer.json`)."""

    def __init__(self, backend, name: str, eos_id: int, pad_id: int | None,
                 side_files: dict[str, dict] | None = None) -> None:
        self._tok = backend
        self.name = name
        self.eos_id = eos_id
        self.pad_id = pad_id
        self._side_files = side_files or {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The "fast" batch call computes the same ids without character offsets.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @cached_property
    def cut_pattern(self) -> re.Pattern | None:
        normalizer = self._tok.normalizer
        return _byte_level_cut_pattern(json.loads(self._tok.to_str()),
                                       normalizer.normalize_str if normalizer is not None else str)

    def _content(self) -> bytes:
        return self._tok.to_str().encode()

    def _save_files(self, directory: Path) -> str:
        self._tok.save(str(directory / HF_FILE))
        for fname, content in self._side_files.items():
            (directory / fname).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        return "hf"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`tokenizer.model`), BPE or unigram."""

    def __init__(self, model_file: str | Path, name: str | None = None) -> None:
        import sentencepiece as spm

        self._model_bytes = Path(model_file).read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self.name = name or Path(model_file).parent.name
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {model_file} has no eos piece; retrain it with "
                             "eos_id set (train_sentencepiece does this)")
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @cached_property
    def cut_pattern(self) -> re.Pattern | None:
        return _sentencepiece_cut_pattern(self._model_bytes)

    def _content(self) -> bytes:
        return self._model_bytes

    def _save_files(self, directory: Path) -> str:
        (directory / SP_FILE).write_bytes(self._model_bytes)
        return "sentencepiece"


# Cut before an ASCII whitespace character that follows a non-whitespace one. Python's `\S` excludes every
# Unicode White_Space character (and more), i.e. everything a tokenizer's regex may treat as whitespace.
_CUT_BEFORE_WHITESPACE = r"(?<=\S)(?=[\t\n\x0b\x0c\r ])"
_CANONICAL_FORMS = frozenset({"NFC", "NFD"})


def _byte_level_cut_pattern(config: dict, normalize: Callable[[str], str]) -> re.Pattern | None:
    """Safe cuts of a byte-level BPE `tokenizer.json` (GPT-2 family: GPT-2, GPT-NeoX/Pythia/Mamba); None for others.
    `config` is the tokenizer's JSON, `normalize` its normalizer (applied to added tokens marked normalized).

    The cut is at i where text[i] is ASCII whitespace and text[i-1] is not whitespace. Why the ids cannot change:
    - Canonical Unicode normalisation (NFC/NFD, the only normalizers accepted) never acts across a position
      before an ASCII character (ASCII characters are starters that no composition takes as its second
      character, so composition, decomposition and reordering stay on one side) and never turns a
      non-whitespace character into whitespace (compatibility forms do: NFKC("\\xa8") == " \\u0308").
    - Added tokens (`<|endoftext|>`, the runs of spaces) are matched first, leftmost-longest. A match crossing
      the cut would contain a non-space followed by ASCII whitespace; no accepted token does (checked, also
      in normalised form), and lstrip/rstrip tokens (which swallow neighbouring whitespace) are refused. So the
      same tokens are found in both halves as in the whole, and the cut coincides with a segment boundary or
      lies inside one segment.
    - Inside a segment the ByteLevel regex `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
      \\s+(?!\\S)|\\s+` splits the text. A match holding a non-whitespace character never continues into
      whitespace after it (only a leading space is optional), so a match starts at the cut. Every alternative
      tried before the cut stops at text[i] exactly as at the end of the string (whitespace ends each
      non-space class and fails each contraction; the `(?!\\S)` look-ahead only follows a whitespace run, which
      ends before text[i-1]); matching from the cut on reads only what follows. The pre-tokens are identical.
    - The BPE model (no dropout), like any model, encodes each pre-token alone. Truncation/padding are refused.
    """
    norm = config.get("normalizer")
    norms = [] if norm is None else norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    pre = config.get("pre_tokenizer") or {}
    if (any(n.get("type") not in _CANONICAL_FORMS for n in norms)
            or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") is not False
            or pre.get("use_regex", True) is not True or config["model"].get("dropout")
            or config.get("truncation") is not None or config.get("padding") is not None):
        return None
    for token in config.get("added_tokens", []):
        forms = [token["content"]] + ([normalize(token["content"])] if token.get("normalized") else [])
        if token.get("lstrip") or token.get("rstrip") or any(re.search(r"\S[\t\n\x0b\x0c\r ]", f) for f in forms):
            return None
    return re.compile(_CUT_BEFORE_WHITESPACE)


def _sentencepiece_cut_pattern(model_bytes: bytes) -> re.Pattern | None:
    """Safe cuts of a SentencePiece BPE model without dummy prefix or whitespace folding (what
    `train_sentencepiece` writes); None for other models (unigram, Llama-style dummy prefix, custom rules).

    The cut is at i where text[i] is ASCII whitespace c and text[i-1] is neither whitespace nor "▁", for each c
    the vocabulary makes a barrier. With the identity normaliser, no dummy prefix and no whitespace removal,
    normalising is per character (" " -> "▁"), so it commutes with the cut. SentencePiece BPE then merges two
    adjacent symbols only when their concatenation is a vocabulary piece, always the best-scored pair first
    (ties: leftmost). If no piece contains text[i-1] followed by c, no symbol ever spans the cut, and the merges
    on each side are the ones that side makes alone, in the same relative order. " " is a barrier when no piece
    has a non-"▁" character followed by "▁"; another whitespace character when no piece but itself contains it.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(model_bytes)
    norm, trainer = model.normalizer_spec, model.trainer_spec
    if (trainer.model_type != sp_pb2.TrainerSpec.BPE or norm.add_dummy_prefix or norm.remove_extra_whitespaces
            or norm.precompiled_charsmap or trainer.treat_whitespace_as_suffix):
        return None
    pieces = [p.piece.replace(" ", "\u2581") for p in model.pieces]
    barriers = "" if any(re.search("[^\u2581]\u2581", p) for p in pieces) else " "
    barriers += "".join(c for c in "\t\n\x0b\x0c\r" if not any(c in p and p != c for p in pieces))
    if not barriers:
        return None
    return re.compile(rf"(?<=[^\s\u2581])(?=[{re.escape(barriers)}])")


def _token_content(value) -> str | None:
    """A special-token entry of a HF config: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _find_tokenizer_dir(path: Path) -> Path:
    """The folder that holds the tokenizer files for `path` (folder, file or model folder)."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist; pass a folder holding "
                                f"{HF_FILE} (Hugging Face) or {SP_FILE} (SentencePiece)")
    if path.is_file():
        if path.name in (HF_FILE, SP_FILE) or path.suffix in (".json", ".model"):
            return path.parent
        raise ValueError(f"{path} is not a tokenizer file; expected {HF_FILE} or {SP_FILE}")
    for candidate in (path, path / "tokenizer"):
        if (candidate / INFO_FILE).is_file() or (candidate / HF_FILE).is_file() \
                or (candidate / SP_FILE).is_file() or (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer in {path}: expected {HF_FILE} or {SP_FILE} there (or in "
                            f"{path / 'tokenizer'}); train one with `python -m data_prep "
                            "--tokenizer sentencepiece:VOCAB` or point to a HF tokenizer folder")


def _load_hf(directory: Path, info: dict, file: Path | None) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    side = {f: _read_json(directory / f) for f in _HF_SIDE_FILES if (directory / f).is_file()}
    if file is not None and file.is_file():
        backend = RustTokenizer.from_file(str(file))
    else:  # only slow-tokenizer files (vocab.json + merges.txt, ...): let transformers convert
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory))
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{directory} holds a slow-only tokenizer that transformers cannot "
                             "convert to a fast one; save it with tokenizer.json")
        backend = hf.backend_tokenizer
    config = {**side.get("special_tokens_map.json", {}), **side.get("tokenizer_config.json", {})}

    def special_id(key: str) -> int | None:
        content = _token_content(config.get(key))
        return None if content is None else backend.token_to_id(content)

    eos_id = info.get("eos_id", special_id("eos_token"))
    if eos_id is None:
        eos_id = next((backend.token_to_id(t) for t in _EOS_CANDIDATES
                       if backend.token_to_id(t) is not None), None)
    if eos_id is None:
        raise ValueError(f"cannot tell the eos token of the tokenizer in {directory}; add "
                         '"eos_token" to its tokenizer_config.json')
    pad_id = info["pad_id"] if "pad_id" in info else special_id("pad_token")
    name = info.get("name") or config.get("name_or_path") or directory.name
    return HFTokenizer(backend, name=str(name), eos_id=int(eos_id), pad_id=pad_id, side_files=side)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer at `path` (see the module docstring for what `path` may be)."""
    path = Path(path)
    directory = _find_tokenizer_dir(path)
    info = _read_json(directory / INFO_FILE)
    fmt = info.get("format")
    if path.is_file():
        fmt = "sentencepiece" if path.suffix == ".model" else "hf"
    elif fmt is None:
        fmt = "hf" if (directory / HF_FILE).is_file() else (
            "sentencepiece" if (directory / SP_FILE).is_file() else "hf")
    if fmt == "sentencepiece":
        return SentencePieceTokenizer(path if path.is_file() else directory / SP_FILE,
                                      name=info.get("name") or directory.name)
    return _load_hf(directory, info, path if path.is_file() else directory / HF_FILE)


class TokenizerMismatchError(ValueError):
    """Two things that must share a tokenizer (data, checkpoint, model) were made with different ones."""


def saved_tokenizer_hash(directory: str | Path) -> str | None:
    """`content_hash()` of the tokenizer saved in `directory` (or its `tokenizer/` folder), None when it has none."""
    try:
        return load_tokenizer(directory).content_hash()
    except FileNotFoundError:
        return None


def check_same_tokenizer(expected: str, found: str | None, what: str, expected_where: str) -> None:
    """Raise TokenizerMismatchError unless `found` (the hash of `what`'s tokenizer; None: unknown) is `expected`
    (the hash of the tokenizer at `expected_where`), whatever the vocabulary sizes."""
    if found is not None and found != expected:
        raise TokenizerMismatchError(
            f"{what} was made with a different tokenizer than {expected_where} (tokenizer content hash "
            f"{found[:12]} vs {expected[:12]}): token ids would mean different text even if the vocabulary sizes "
            "match. Tokenise the data with the model's own tokenizer (`python -m data_prep --tokenizer hf:MODEL_DIR`) "
            "or use a model/checkpoint trained on this tokenizer")


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int,
                        model_type: str = "bpe", name: str | None = None, num_threads: int = 1,
                        max_sentence_bytes: int = 16384) -> SentencePieceTokenizer:
    """Train a SentencePiece tokenizer on `texts` and save it into `out_dir`.

    Exact round trip by construction: byte fallback on (no `<unk>` for unseen characters), no
    Unicode normalisation, whitespace kept as is, no dummy prefix (so a window cut from the middle
    of a document decodes to exactly its own text), and `\\n`/`\\t`/`\\r` as single user-defined
    pieces because SentencePiece trains on lines. Each text is fed line by line; lines longer than
    `max_sentence_bytes` are left out of training (they are still encoded later, via byte fallback
    if need be). Ids: 0 `<unk>`, 1 `<s>`, 2 `</s>` (eos), 3 `<pad>`.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    # 4 specials + 256 byte pieces + 3 user-defined pieces must fit, plus room for merges.
    min_vocab = 4 + 256 + 3 + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs "
                         f"{min_vocab - 1} ids; use at least {min_vocab}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def lines() -> Iterable[str]:
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines()), model_prefix=str(out_dir / "tokenizer"),
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
            allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "\t", "\r"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, max_sentence_length=max_sentence_bytes,
            num_threads=max(1, num_threads), minloglevel=2, train_extremely_large_corpus=False)
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}: {err}. "
                         "If the corpus is too small for this vocabulary, lower the vocab size or "
                         "use unigram/bpe with more text.") from err
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    tok = SentencePieceTokenizer(out_dir / SP_FILE, name=name or f"sp-{model_type}-{vocab_size}")
    tok.save(out_dir)
    return tok


__all__ = ["Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "load_tokenizer",
           "train_sentencepiece"]
