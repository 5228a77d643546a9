"""Training data for a run: build the shards when asked (rank 0), open them, check they fit the run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from adaptive_mamba.data import DataPrepConfig, TokenShards, WindowSampler, build_shards
from adaptive_mamba.training.config import TrainConfig
from adaptive_mamba.training.distributed import DistContext, barrier, broadcast_object


def resolve_data_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.data_dir) if cfg.data_dir is not None else Path(cfg.output_dir) / "data"


def prepare_shards(cfg: TrainConfig, ctx: DistContext) -> Path:
    """The shard directory, built by rank 0 first when `data_source` is set (idempotent: a finished build is
    reused). Without `data_source` the shards must already exist."""
    out = resolve_data_dir(cfg)
    error: Optional[str] = None
    if ctx.is_main:
        try:
            if cfg.data_source is not None:
                max_bytes = None if cfg.data_max_mb is None else int(cfg.data_max_mb * 2 ** 20)
                build_shards(DataPrepConfig(out_dir=out, source=cfg.data_source, tokenizer=cfg.tokenizer,
                                            max_bytes=max_bytes, val_fraction=cfg.val_fraction, seed=cfg.seed))
            elif not (out / "metadata.json").is_file():
                error = (f"data_dir {out} holds no token shards (no metadata.json). Build them first, e.g. "
                         f"`python -m data_prep --out {out}`, or set data_source=stdlib to build them here")
        except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
            error = f"could not build the training data in {out}: {err}"
    error = broadcast_object(error)
    if error is not None:
        raise FileNotFoundError(error)
    barrier()
    return out


def make_sampler(shards: TokenShards, cfg: TrainConfig, ctx: DistContext, train: bool) -> WindowSampler:
    """This rank's window sampler. Training drops the last incomplete step (no padding-only rows). With
    context_parallel = P, the P ranks of a context-parallel group (consecutive ranks) read the same sequences."""
    if cfg.packing == "pad" and train:
        longest = int(shards.doc_lengths.max()) + 1
        if cfg.seq_len > longest:
            raise ValueError(f"seq_len={cfg.seq_len} is larger than the longest document in {shards.path} "
                             f"({longest} tokens with EOS) and packing=pad puts one document per window, so every "
                             f"window would be mostly padding. Use packing=pack (documents concatenated) or "
                             f"seq_len <= {longest}")
    if ctx.world_size % cfg.context_parallel:
        raise ValueError(f"context_parallel={cfg.context_parallel} must divide the number of ranks ({ctx.world_size}): "
                         "set it to a divisor or launch a multiple of it")
    cp = cfg.context_parallel
    sampler = WindowSampler(shards, cfg.seq_len, cfg.batch_size, ctx.rank // cp, ctx.world_size // cp, cfg.seed,
                            cfg.packing, shuffle=train, drop_last=train)
    if train and sampler.steps_per_epoch(0) < cfg.grad_accum_steps:
        raise ValueError(f"the training split of {shards.path} has {sampler.layout(0).n_windows} windows of "
                         f"{cfg.seq_len} tokens: fewer than one optimizer step needs (data-parallel ranks {ctx.world_size // cp} x "
                         f"batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps}). Use more data, a "
                         "shorter seq_len or a smaller batch")
    return sampler
