"""Training data for a run: build the shards when asked (rank 0), verify and open them, check they fit the run."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from adaptive_mamba.data import CorruptShardError, TokenShards, WindowSampler, build_shards
from adaptive_mamba.tokenizer import check_same_tokenizer, saved_tokenizer_hash
from adaptive_mamba.training.config import TrainConfig
from adaptive_mamba.training.distributed import DistContext, barrier, broadcast_object


def resolve_data_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.data.dir) if cfg.data.dir is not None else Path(cfg.train.output_dir) / "data"


VERIFIED_FILE = "verified_shards.json"


def verify_shards(data_dir: Path, output_dir: Path) -> None:
    """Check every shard of every split against its sha256 (CorruptShardError naming the file). Files verified
    before by this run (same size and mtime, recorded in output_dir/verified_shards.json) are not read again."""
    record = output_dir / VERIFIED_FILE
    cache = json.loads(record.read_text()) if record.is_file() else {}
    for split in TokenShards(data_dir, "train").metadata["splits"]:
        cache = TokenShards(data_dir, split).verify(cache)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(cache, indent=1) + "\n")
    os.replace(tmp, record)


def prepare_shards(cfg: TrainConfig, ctx: DistContext) -> Path:
    """The shard directory, built by rank 0 first when `data.source` is set (idempotent: a finished build is
    reused), then verified by rank 0 (`verify_shards`). Without `data.source` the shards must already exist."""
    out = resolve_data_dir(cfg)
    error: Optional[str] = None
    corrupt = False
    if ctx.is_main:
        try:
            if cfg.data.source is not None:
                build_shards(cfg.data.prep_config(out, cfg.train.seed))
            elif not (out / "metadata.json").is_file():
                error = (f"data.dir {out} holds no token shards (no metadata.json). Build them first, e.g. "
                         f"`python -m data_prep --out {out}`, or set data.source=stdlib to build them here")
            if error is None:
                verify_shards(out, Path(cfg.train.output_dir))
        except CorruptShardError as err:
            error, corrupt = str(err), True
        except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
            error = f"could not build the training data in {out}: {err}"
    error, corrupt = broadcast_object((error, corrupt))
    if error is not None:
        raise (CorruptShardError if corrupt else FileNotFoundError)(error)
    barrier()
    return out


def check_tokenizer(shards: TokenShards, cfg: TrainConfig, resume_from: Optional[Path],
                    resume_state: Optional[dict]) -> str:
    """The content hash of the data's tokenizer, after checking that the shards' metadata, the init_from model's
    tokenizer (when it ships one) and the checkpoint being resumed all name the same tokenizer."""
    data_hash = shards.tokenizer().content_hash()
    where = f"the training data {shards.path}"
    check_same_tokenizer(data_hash, shards.metadata["tokenizer"].get("content_sha256"),
                         f"the token ids in {shards.path} (metadata.json)", "the tokenizer saved with them")
    if cfg.train.init_from is not None:
        check_same_tokenizer(data_hash, saved_tokenizer_hash(cfg.train.init_from),
                             f"train.init_from={cfg.train.init_from}", where)
    if resume_state is not None:
        check_same_tokenizer(data_hash, resume_state.get("tokenizer_sha256"), f"the checkpoint {resume_from}", where)
    return data_hash


def make_sampler(shards: TokenShards, cfg: TrainConfig, ctx: DistContext, train: bool) -> WindowSampler:
    """This rank's window sampler. Training drops the last incomplete step (no padding-only rows). With
    context_parallel = P, the P ranks of a context-parallel group (consecutive ranks) read the same sequences."""
    t = cfg.train
    if cfg.data.packing == "pad" and train:
        longest = int(shards.doc_lengths.max()) + 1
        if t.seq_len > longest:
            raise ValueError(f"train.seq_len={t.seq_len} is larger than the longest document in {shards.path} "
                             f"({longest} tokens with EOS) and data.packing=pad puts one document per window, so every "
                             f"window would be mostly padding. Use data.packing=pack (documents concatenated) or "
                             f"train.seq_len <= {longest}")
    if ctx.world_size % t.context_parallel:
        raise ValueError(f"train.context_parallel={t.context_parallel} must divide the number of ranks "
                         f"({ctx.world_size}): set it to a divisor or launch a multiple of it")
    cp = t.context_parallel
    sampler = WindowSampler(shards, t.seq_len, t.batch_size, ctx.rank // cp, ctx.world_size // cp, t.seed,
                            cfg.data.packing, shuffle=train, drop_last=train)
    if train and sampler.steps_per_epoch(0) < t.grad_accum_steps:
        raise ValueError(f"the training split of {shards.path} has {sampler.layout(0).n_windows} windows of "
                         f"{t.seq_len} tokens: fewer than one optimizer step needs (data-parallel ranks "
                         f"{ctx.world_size // cp} x train.batch_size {t.batch_size} x train.grad_accum_steps "
                         f"{t.grad_accum_steps}). Use more data, a shorter train.seq_len or a smaller batch")
    return sampler
