"""Distributed training glue: config, DeepSpeed engine, pillars in the loop, checkpoints, monitoring.

    from adaptive_mamba.training import TrainConfig, load_train_config, Trainer, DistContext
Entry point: `launch/train.py` (reads the launcher's environment and the command line; this package does not).
"""
from adaptive_mamba.training.config import TrainConfig, load_train_config, parse_overrides
from adaptive_mamba.training.distributed import DistContext

__all__ = ["TrainConfig", "load_train_config", "parse_overrides", "DistContext"]
