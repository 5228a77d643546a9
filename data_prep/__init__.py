"""Command line front end of adaptive_mamba.data: corpus -> tokenizer -> packed token shards."""
