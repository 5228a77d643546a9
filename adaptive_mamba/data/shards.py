"""Corpus -> tokenizer -> packed token shards, and the memory-mapped shard reader.

Output layout of `build_shards(cfg)` (all under `cfg.out_dir`)::

    tokenizer/                     the tokenizer (load_tokenizer(out_dir / "tokenizer"))
    plan.json                      the document plan: config, input sha, split/shard assignment
    train/shard_00000.bin          flat token ids of the shard's documents, uint16 or uint32
    train/shard_00000.idx.npy      int64 document offsets into the .bin (n_docs + 1 entries)
    train/shard_00000.json         written last: counts, sha256 of the .bin, document keys
    val/...                        the same for the validation split
    metadata.json                  written when every shard is done (what TokenShards reads)

Shards hold documents' tokens only (no separators): the loader inserts EOS when it packs.
Build in two passes over the source: the first fixes the plan (documents, sizes, sha of the
inputs, the train/val split by document, the shard grouping), the second tokenises shard by shard
in worker processes. A shard whose `.json` exists and matches the plan is skipped, so an
interrupted build resumes where it stopped and a finished one is a no-op (idempotent).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from adaptive_mamba.config import Settings, above, at_least, between, setting
from adaptive_mamba.data.bulk_encode import BulkEncoder
from adaptive_mamba.data.sources import Document, DocumentReader
from adaptive_mamba.fileio import file_sha256
from adaptive_mamba.tokenizer import INFO_FILE, Tokenizer, load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
SPLITS = ("train", "val")
PACKING_MODES = ("pack", "pad", "document")     # how WindowSampler cuts shards into windows


@dataclass
class DataPrepConfig:
    """Everything `build_shards` needs. See README.md, "Data preparation", for the CLI equivalents.

    tokenizer: ``"sentencepiece:VOCAB"`` (train BPE on the training split; ``sp_model_type``
    picks bpe/unigram), ``"hf:PATH"`` (a local HF tokenizer folder, or a hub name when the hub is
    reachable) or a plain path to any folder `load_tokenizer` reads.
    shard_size_mb: a shard is closed once it holds this much text (a document is never split).
    """

    out_dir: str | Path
    source: str = "stdlib"
    tokenizer: str = "sentencepiece:8192"
    text_field: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"
    articles: str = "auto"
    max_docs: int | None = None
    max_bytes: int | None = None
    on_decode_error: str = "skip"
    val_fraction: float = 0.05
    shard_size_mb: float = 64.0
    token_dtype: str = "auto"
    num_workers: int = 1
    seed: int = 0
    sp_model_type: str = "bpe"
    sp_max_train_mb: float = 200.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")
        if self.token_dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"token_dtype must be auto, uint16 or uint32, got {self.token_dtype!r}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    def reader(self) -> DocumentReader:
        return DocumentReader(self.source, text_field=self.text_field, hf_config=self.hf_config,
                              hf_split=self.hf_split, articles=self.articles,
                              on_decode_error=self.on_decode_error, max_docs=self.max_docs,
                              max_bytes=self.max_bytes)

    def plan_fields(self) -> dict:
        """The settings that change the shards' content (not workers, not overwrite)."""
        d = asdict(self)
        for k in ("out_dir", "num_workers", "overwrite"):
            d.pop(k)
        return d


@dataclass
class DataConfig(Settings):
    """The `data` section of a training config: where the token shards are, and how to build them when missing
    (`prep_config`, consumed by `build_shards`) and cut them into training windows (`packing`)."""

    dir: str | None = setting(None, "token shards from data_prep (None: <train.output_dir>/data); built there first "
                              "when missing and source is set")
    source: str | None = setting(None, "build the shards from this source: stdlib | folder:PATH | hf:NAME (None: "
                                 "dir must hold shards)")
    tokenizer: str = setting(DataPrepConfig.tokenizer, "tokenizer for building shards: sentencepiece:VOCAB | hf:PATH "
                             "| a tokenizer folder")
    max_mb: float | None = setting(None, "cap on the source text when building shards (MiB)", check=above(0))
    val_fraction: float = setting(DataPrepConfig.val_fraction, "fraction of documents held out for validation",
                                  check=between(0, 1, True))
    hf_split: str = setting(DataPrepConfig.hf_split, "split of an hf: source")
    num_workers: int = setting(DataPrepConfig.num_workers, "tokenizer processes when building shards",
                               check=at_least(1))
    packing: str = setting("pack", "pack: concatenate documents | pad: one document per window | document: whole "
                           "documents (cut at seq_len), unpadded", choices=PACKING_MODES)

    def prep_config(self, out_dir: Path, seed: int) -> DataPrepConfig:
        """The shard build of this section (requires `source`)."""
        max_bytes = None if self.max_mb is None else int(self.max_mb * 2 ** 20)
        return DataPrepConfig(out_dir=out_dir, source=self.source, tokenizer=self.tokenizer, max_bytes=max_bytes,
                              val_fraction=self.val_fraction, hf_split=self.hf_split, num_workers=self.num_workers,
                              seed=seed)


def token_dtype_for(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; checks a forced choice."""
    if requested == "uint32":
        return np.dtype(np.uint32)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if requested == "uint16":
        raise ValueError(f"vocab size {vocab_size} does not fit in uint16 (max id 65535); use "
                         "token_dtype='uint32' or 'auto'")
    if vocab_size > 1 << 32:
        raise ValueError(f"vocab size {vocab_size} does not fit in uint32")
    return np.dtype(np.uint32)


@dataclass
class _ShardSpec:
    split: str
    index: int
    doc_positions: list[int] = field(default_factory=list)  # global document indices
    text_bytes: int = 0

    @property
    def stem(self) -> str:
        return f"{self.split}/shard_{self.index:05d}"


def _plan(cfg: DataPrepConfig) -> tuple[dict, list[_ShardSpec]]:
    """First pass: document keys/sizes, sha of the inputs, split and shard assignment."""
    reader = cfg.reader()
    sha = hashlib.sha256()
    keys, sizes = [], []
    for doc in tqdm(reader, desc="scan documents", unit="doc"):
        data = doc.text.encode("utf-8")
        sha.update(doc.key.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little") + data)
        keys.append(doc.key)
        sizes.append(len(data))
    if not keys:
        raise ValueError(f"source {cfg.source!r} produced no documents "
                         f"(skipped: {reader.skipped.as_dict()})")
    if reader.skipped.total():
        log.warning("skipped %d inputs (%s)", reader.skipped.total(), reader.skipped.as_dict())
    n = len(keys)
    n_val = int(round(cfg.val_fraction * n))
    if cfg.val_fraction > 0:
        if n < 2:
            raise ValueError(f"only {n} document, cannot hold out a validation split; pass "
                             "val_fraction=0 or add documents")
        n_val = min(max(n_val, 1), n - 1)
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(cfg.seed).permutation(n)[:n_val]] = True

    limit = int(cfg.shard_size_mb * (1 << 20))
    shards: list[_ShardSpec] = []
    open_shard: dict[str, _ShardSpec] = {}
    counters = {s: 0 for s in SPLITS}
    for i, size in enumerate(sizes):
        split = "val" if is_val[i] else "train"
        spec = open_shard.get(split)
        if spec is None or spec.text_bytes >= limit:
            spec = _ShardSpec(split, counters[split])
            counters[split] += 1
            open_shard[split] = spec
            shards.append(spec)
        spec.doc_positions.append(i)
        spec.text_bytes += size
    plan = {"format_version": FORMAT_VERSION, "config": cfg.plan_fields(),
            "input_sha256": sha.hexdigest(), "n_docs": n, "n_val_docs": n_val,
            "text_bytes": int(sum(sizes)), "skipped": reader.skipped.as_dict(),
            "shards": [{"stem": s.stem, "n_docs": len(s.doc_positions), "text_bytes": s.text_bytes}
                       for s in shards]}
    plan["plan_id"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return plan, shards


def _tokenizer_fingerprint(directory: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", INFO_FILE):
        if (directory / name).is_file():
            h.update(name.encode() + (directory / name).read_bytes())
    return h.hexdigest()[:16]


def _resolve_hf_tokenizer(name: str) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (tokenizer files only)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer folder {name} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["tokenizer*", "special_tokens_map.json",
                                                            "vocab*", "merges.txt"]))
    except Exception as err:
        raise FileNotFoundError(f"tokenizer {name!r} is neither a local folder nor reachable on "
                                f"the hub ({err}); pass hf:PATH to a local tokenizer folder") from err


def _prepare_tokenizer(cfg: DataPrepConfig, is_val: set[int]) -> Tokenizer:
    """Train or load the tokenizer and save it into out_dir/tokenizer (reused when present)."""
    tok_dir = cfg.out_dir / "tokenizer"
    kind, _, arg = cfg.tokenizer.partition(":")
    if kind == "sentencepiece":
        try:
            vocab = int(arg)
        except ValueError:
            raise ValueError(f"tokenizer {cfg.tokenizer!r}: expected sentencepiece:VOCAB_SIZE, "
                             "e.g. sentencepiece:8192") from None
        if (tok_dir / "tokenizer.model").is_file():
            return load_tokenizer(tok_dir)
        budget = int(cfg.sp_max_train_mb * (1 << 20))

        def train_texts() -> Iterator[str]:
            used = 0
            for i, doc in enumerate(cfg.reader()):
                if i in is_val:
                    continue
                yield doc.text
                used += len(doc.text)
                if used >= budget:
                    return

        return train_sentencepiece(train_texts(), tok_dir, vocab, model_type=cfg.sp_model_type,
                                   num_threads=cfg.num_workers)
    source = _resolve_hf_tokenizer(arg) if kind == "hf" else Path(cfg.tokenizer)
    tok = load_tokenizer(source)
    if not (tok_dir / INFO_FILE).is_file():
        tok.save(tok_dir)
    return load_tokenizer(tok_dir)


_WORKER_ENCODER: dict[str, BulkEncoder] = {}


def _worker_init() -> None:
    # Each worker process is one CPU; the Rust tokenizer must not spawn its own threads too.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenize_shard(tok_dir: str, stem_path: str, texts: list[str], keys: list[str],
                    dtype: str, meta: dict) -> dict:
    """Tokenise one shard's documents and write .bin, .idx.npy, then the .json marker."""
    encoder = _WORKER_ENCODER.get(tok_dir)
    if encoder is None:  # one per process and build: its cache of distinct pieces carries over to the next shard
        encoder = _WORKER_ENCODER[tok_dir] = BulkEncoder(load_tokenizer(tok_dir))
    vocab_size = encoder.tokenizer.vocab_size
    np_dtype = np.dtype(dtype)
    limit = min(vocab_size, np.iinfo(np_dtype).max + 1)
    stem = Path(stem_path)
    lengths = np.zeros(len(texts), dtype=np.int64)
    tmp_bin = stem.with_name(stem.name + ".bin.tmp")
    with tmp_bin.open("wb") as out:
        for ids, seg_doc, seg_len in encoder.iter_encode(texts):
            bad = (ids < 0) | (ids >= limit)
            if bad.any():
                j = seg_doc[np.searchsorted(np.cumsum(seg_len), int(np.argmax(bad)), side="right")]
                raise ValueError(f"{keys[j]}: token id {int(ids[bad][0])} does not fit (vocab "
                                 f"{vocab_size}, dtype {dtype}); no shard was written")
            np.add.at(lengths, seg_doc, seg_len)
            ids.astype(np_dtype).tofile(out)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    bin_path = stem.with_name(stem.name + ".bin")
    os.replace(tmp_bin, bin_path)
    np.save(stem.with_name(stem.name + ".idx.npy"), offsets)
    marker = {**meta, "n_docs": len(texts), "n_tokens": int(offsets[-1]),
              "text_bytes": int(sum(len(t.encode("utf-8")) for t in texts)),
              "bin_sha256": file_sha256(bin_path), "docs": keys}
    tmp_json = stem.with_name(stem.name + ".json.tmp")
    tmp_json.write_text(json.dumps(marker))
    os.replace(tmp_json, stem.with_name(stem.name + ".json"))
    return marker


def _shard_done(stem: Path, meta: dict, itemsize: int) -> dict | None:
    """The shard's marker when it exists, matches `meta` and its .bin has the recorded size."""
    marker_path = stem.with_name(stem.name + ".json")
    bin_path = stem.with_name(stem.name + ".bin")
    if not marker_path.is_file() or not bin_path.is_file():
        return None
    marker = json.loads(marker_path.read_text())
    if any(marker.get(k) != v for k, v in meta.items()):
        return None
    if bin_path.stat().st_size != marker["n_tokens"] * itemsize:
        return None
    return marker


def _check_out_dir(cfg: DataPrepConfig, plan: dict) -> None:
    """Refuse to mix shards of a different plan into out_dir unless overwrite is set."""
    plan_path = cfg.out_dir / "plan.json"
    if not plan_path.is_file():
        return
    old = json.loads(plan_path.read_text())
    if old.get("plan_id") == plan["plan_id"]:
        return
    if not cfg.overwrite:
        raise FileExistsError(f"{cfg.out_dir} holds shards of a different corpus or config (plan "
                              f"{old.get('plan_id')} != {plan['plan_id']}); use another --out or "
                              "pass overwrite=True (--overwrite) to rebuild it")
    for name in ("metadata.json", "plan.json"):
        (cfg.out_dir / name).unlink(missing_ok=True)
    for name in (*SPLITS, "tokenizer"):
        shutil.rmtree(cfg.out_dir / name, ignore_errors=True)


def build_shards(cfg: DataPrepConfig) -> Path:
    """Build (or resume, or confirm) the token shards for `cfg`; returns `cfg.out_dir`."""
    out = Path(cfg.out_dir)
    plan, specs = _plan(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(cfg, plan)
    (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    is_val = {i for s in specs if s.split == "val" for i in s.doc_positions}
    tok = _prepare_tokenizer(cfg, is_val)
    dtype = token_dtype_for(tok.vocab_size, cfg.token_dtype)
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
    meta = {"plan_id": plan["plan_id"], "tokenizer_sha": _tokenizer_fingerprint(out / "tokenizer"),
            "dtype": dtype.name}

    markers: dict[str, dict] = {}
    todo = {s.stem: s for s in specs}
    for spec in specs:
        done = _shard_done(out / spec.stem, meta, dtype.itemsize)
        if done is not None:
            markers[spec.stem] = done
            del todo[spec.stem]
    if todo:
        _run_shards(cfg, out, todo, specs, meta, dtype, markers)
    else:
        log.info("all %d shards already built in %s", len(specs), out)
    return _write_metadata(cfg, out, plan, specs, markers, tok, dtype)


def _shard_texts(cfg: DataPrepConfig, todo: dict[str, _ShardSpec],
                 specs: list[_ShardSpec]) -> Iterator[tuple[_ShardSpec, list[Document]]]:
    """Second pass over the source: yields each unfinished shard with its documents."""
    owner = {i: s for s in specs for i in s.doc_positions}
    buffers: dict[str, list[Document]] = {stem: [] for stem in todo}
    for i, doc in enumerate(cfg.reader()):
        spec = owner.get(i)
        if spec is None:
            raise RuntimeError(f"the source yielded more documents than planned ({doc.key}); "
                               "it changed during the build, rerun build_shards")
        if spec.stem not in buffers:
            continue
        buf = buffers[spec.stem]
        buf.append(doc)
        if len(buf) == len(spec.doc_positions):
            yield spec, buffers.pop(spec.stem)
    if buffers:
        raise RuntimeError(f"the source yielded fewer documents than planned (shards "
                           f"{sorted(buffers)[:3]} incomplete); it changed during the build")


def _run_shards(cfg: DataPrepConfig, out: Path, todo: dict[str, _ShardSpec],
                specs: list[_ShardSpec], meta: dict, dtype: np.dtype, markers: dict) -> None:
    """Tokenise the unfinished shards, in-process (1 worker) or in a spawn-process pool."""
    tok_dir = str(out / "tokenizer")
    bar = tqdm(total=sum(s.text_bytes for s in todo.values()), unit="B", unit_scale=True,
               desc=f"tokenize {len(todo)} shards")

    def args(spec: _ShardSpec, docs: list[Document]) -> tuple:
        return (tok_dir, str(out / spec.stem), [d.text for d in docs], [d.key for d in docs],
                dtype.name, meta)

    def finish(marker: dict, stem: str) -> None:
        markers[stem] = marker
        bar.update(todo[stem].text_bytes)

    try:
        if cfg.num_workers == 1:
            for spec, docs in _shard_texts(cfg, todo, specs):
                finish(_tokenize_shard(*args(spec, docs)), spec.stem)
            return
        with ProcessPoolExecutor(cfg.num_workers, mp_context=get_context("spawn"),
                                 initializer=_worker_init) as pool:
            pending: dict[Future, str] = {}
            for spec, docs in _shard_texts(cfg, todo, specs):
                pending[pool.submit(_tokenize_shard, *args(spec, docs))] = spec.stem
                while len(pending) >= 2 * cfg.num_workers:  # bound the text held in memory
                    _collect_first(pending, finish)
            while pending:
                _collect_first(pending, finish)
    finally:
        bar.close()
        # Forget the in-process encoder: its piece cache is memory, and an --overwrite rebuild may put another
        # tokenizer in the same folder.
        _WORKER_ENCODER.clear()


def _collect_first(pending: dict[Future, str], finish) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
    for fut in done:
        finish(fut.result(), pending.pop(fut))


def _write_metadata(cfg: DataPrepConfig, out: Path, plan: dict, specs: list[_ShardSpec],
                    markers: dict, tok: Tokenizer, dtype: np.dtype) -> Path:
    splits = {}
    for split in SPLITS:
        shards = [{"file": f"{s.stem}.bin", "index": f"{s.stem}.idx.npy",
                   "n_docs": markers[s.stem]["n_docs"], "n_tokens": markers[s.stem]["n_tokens"],
                   "bin_sha256": markers[s.stem]["bin_sha256"]}
                  for s in specs if s.split == split]
        splits[split] = {"n_docs": sum(s["n_docs"] for s in shards),
                         "n_tokens": sum(s["n_tokens"] for s in shards), "shards": shards}
    metadata = {
        "format_version": FORMAT_VERSION, "plan_id": plan["plan_id"], "source": cfg.source,
        "input_sha256": plan["input_sha256"], "text_bytes": plan["text_bytes"],
        "skipped": plan["skipped"], "dtype": dtype.name,
        "tokenizer": {"dir": "tokenizer", "name": tok.name, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                      "sha": _tokenizer_fingerprint(out / "tokenizer"), "content_sha256": tok.content_hash()},
        "n_tokens": sum(s["n_tokens"] for s in splits.values()), "splits": splits,
        "config": plan["config"],
    }
    tmp = out / "metadata.json.tmp"
    tmp.write_text(json.dumps(metadata, indent=1) + "\n")
    os.replace(tmp, out / "metadata.json")
    return out


class CorruptShardError(ValueError):
    """A shard file whose bytes differ from metadata.json, or that holds ids outside the tokenizer's range."""


class TokenShards:
    """Read-only view of one split: documents as memory-mapped slices of the shard files.

    Nothing is loaded up front but the small document index; `doc(i)` returns a numpy view
    into the memory map, so a 500k-token book costs only the pages actually read, and checks
    its ids against the tokenizer's range. `verify()` checks whole files against their sha256.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not meta_path.is_file():
            hint = (" (the build was interrupted; rerun build_shards / python -m data_prep with "
                    "the same arguments to finish it)") if (self.path / "plan.json").is_file() else ""
            raise FileNotFoundError(f"no metadata.json in {self.path}{hint}")
        self.metadata = json.loads(meta_path.read_text())
        if split not in self.metadata["splits"]:
            raise ValueError(f"unknown split {split!r}; have {sorted(self.metadata['splits'])}")
        self.split = split
        self.dtype = np.dtype(self.metadata["dtype"])
        tok = self.metadata["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.eos_id: int = tok["eos_id"]
        self.pad_id: int | None = tok["pad_id"]
        self._shards = self.metadata["splits"][split]["shards"]
        doc_shard, doc_start, doc_len = [], [], []
        for k, shard in enumerate(self._shards):
            offsets = np.load(self.path / shard["index"])
            if int(offsets[-1]) != shard["n_tokens"]:
                raise ValueError(f"{shard['index']} does not match metadata.json "
                                 f"({int(offsets[-1])} vs {shard['n_tokens']} tokens); rebuild")
            n_bytes = (self.path / shard["file"]).stat().st_size
            if n_bytes != shard["n_tokens"] * self.dtype.itemsize:
                raise ValueError(f"{shard['file']} has {n_bytes} bytes, expected "
                                 f"{shard['n_tokens'] * self.dtype.itemsize}; the shard is "
                                 "truncated or corrupt, rebuild it")
            doc_shard.append(np.full(len(offsets) - 1, k, dtype=np.int32))
            doc_start.append(offsets[:-1])
            doc_len.append(np.diff(offsets))
        self.doc_shard = np.concatenate(doc_shard) if doc_shard else np.zeros(0, np.int32)
        self.doc_start = np.concatenate(doc_start) if doc_start else np.zeros(0, np.int64)
        self.doc_lengths = np.concatenate(doc_len) if doc_len else np.zeros(0, np.int64)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:
            shard = self._shards[k]
            if shard["n_tokens"] == 0:
                self._maps[k] = np.zeros(0, dtype=self.dtype)
            else:
                self._maps[k] = np.memmap(self.path / shard["file"], dtype=self.dtype, mode="r")
        return self._maps[k]

    def doc(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of document i (a view into the memory map), checked against the vocabulary."""
        n = int(self.doc_lengths[i])
        stop = n if stop is None else min(stop, n)
        base = int(self.doc_start[i])
        tokens = self._map(int(self.doc_shard[i]))[base + start:base + stop]
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            shard = self.path / self._shards[int(self.doc_shard[i])]["file"]
            raise CorruptShardError(f"{shard}: token id {int(tokens.max())} in document {i} is outside the "
                                    f"tokenizer's range 0..{self.vocab_size - 1}: the shard is corrupt or was written "
                                    "with another tokenizer; rebuild it with `python -m data_prep`")
        return tokens

    def verify(self, cache: dict[str, dict] | None = None) -> dict[str, dict]:
        """Check every shard file of the split against the sha256 in metadata.json (CorruptShardError naming the
        file). `cache` maps resolved file paths to the {bytes, mtime_ns, sha256} already verified, so unchanged
        files are not read again (a resumed run starts at once); the updated cache is returned."""
        cache = dict(cache or {})
        for shard in self._shards:
            path = (self.path / shard["file"]).resolve()
            st = path.stat()
            seen = cache.get(str(path))
            if seen and seen["bytes"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns \
                    and seen["sha256"] == shard["bin_sha256"]:
                continue
            if file_sha256(path) != shard["bin_sha256"]:
                raise CorruptShardError(f"shard {path} does not match the sha256 recorded in "
                                        f"{self.path / 'metadata.json'}: the file is corrupt; rebuild the shards "
                                        "(`python -m data_prep` with the same arguments) or restore the file")
            cache[str(path)] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": shard["bin_sha256"]}
        return cache

    def doc_keys(self) -> list[str]:
        """Source keys of the documents (file names, line numbers, ...), in index order."""
        keys: list[str] = []
        for shard in self._shards:
            marker = json.loads((self.path / shard["file"].replace(".bin", ".json")).read_text())
            keys.extend(marker["docs"])
        return keys

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / self.metadata["tokenizer"]["dir"])

    def __getstate__(self) -> dict:  # memory maps are reopened in the receiving process
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state
