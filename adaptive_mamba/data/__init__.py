"""Data preparation and long-sequence loading (the interface training and eval import).

Build shards once (or from the CLI: ``python -m data_prep``)::

    from adaptive_mamba.data import DataPrepConfig, build_shards, TokenShards, WindowSampler
    out = build_shards(DataPrepConfig(out_dir="runs/data", source="folder:../shared/data/books",
                                      tokenizer="hf:../shared/data/tokenizers/gpt-neox-20b"))

Read them in training, per data-parallel rank::

    train = TokenShards(out, split="train")       # memory-mapped; also split="val"
    sampler = WindowSampler(train, seq_len=8192, batch_size=2, rank=rank, world_size=world,
                            seed=seed, mode="pack")  # or mode="pad": one document per window
    sampler.set_epoch(epoch)
    sampler.load_state_dict(ckpt["data"])         # exact resume: {"epoch", "step", ...}
    for batch in sampler:                         # {"input_ids", "labels"}: LongTensor (B, seq_len)
        ...                                       # labels = input_ids, -100 on padding
        ckpt["data"] = sampler.state_dict()
    sampler.batch_at(step, epoch)                 # any step directly, no history needed

``train.tokenizer()`` loads the tokenizer saved next to the shards.
"""
from adaptive_mamba.data.loader import IGNORE_INDEX, WindowSampler
from adaptive_mamba.data.shards import (CorruptShardError, DataConfig, DataPrepConfig, TokenShards, build_shards,
                                      token_dtype_for)
from adaptive_mamba.data.sources import Document, DocumentReader, SkipStats, split_wikitext_articles

__all__ = ["CorruptShardError", "DataConfig", "DataPrepConfig", "build_shards", "TokenShards", "token_dtype_for",
           "WindowSampler", "IGNORE_INDEX", "Document", "DocumentReader", "SkipStats", "split_wikitext_articles"]
