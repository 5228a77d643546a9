"""Training entry point.

    deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 launch/train.py --config configs/demo.yaml
    python launch/train.py --config configs/demo.yaml            # one process
    srun python launch/train.py ...                               # Slurm (see slurm/train.sh)

Reads the topology from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (set by the
launchers; SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are used when only Slurm set them); with no
WORLD_SIZE it runs one process. SIGTERM / SIGUSR1: finish the current optimizer step, save a
complete checkpoint on all ranks and exit 99 (requeue); normal completion exits 0; errors exit 1
(bad input: 2). Each rank also writes that code as an exit record into $ADAPTIVE_MAMBA_EXIT_DIR when
it is set: launch/run.py and slurm/train.sh read the records, because torchrun and the deepspeed
launcher turn every failing exit status into 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from launch.run import EXIT_BAD_INPUT, EXIT_DIR_ENV, EXIT_OTHER, EXIT_PREEMPTED, write_record  # noqa: E402


def dist_context_from_env():
    """The topology from the launcher's variables (Slurm's when only srun set them; one process when none).
    The resolved values are written back to the environment, where DeepSpeed also looks for them."""
    from adaptive_mamba.training.distributed import DistContext, free_port

    env = os.environ
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        ctx = DistContext(rank=int(env.get("SLURM_PROCID", 0)), world_size=int(env["SLURM_NTASKS"]),
                          local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=env["MASTER_ADDR"],
                          master_port=int(env.get("MASTER_PORT", 29500)))
    elif "WORLD_SIZE" not in env:
        ctx = DistContext(master_port=free_port())
    else:
        ctx = DistContext(rank=int(env.get("RANK", 0)), world_size=int(env["WORLD_SIZE"]),
                          local_rank=int(env.get("LOCAL_RANK", 0)), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=int(env.get("MASTER_PORT", 0)))
    env.update({"RANK": str(ctx.rank), "WORLD_SIZE": str(ctx.world_size), "LOCAL_RANK": str(ctx.local_rank),
                "MASTER_ADDR": ctx.master_addr, "MASTER_PORT": str(ctx.master_port)})
    return ctx


def wandb_mode_from_env(requested: str, enabled: bool) -> str:
    """disabled when turned off; otherwise the config's mode, or with "auto": WANDB_MODE if set, online when an
    API key is configured, offline otherwise."""
    if not enabled:
        return "disabled"
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and \
        "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    return "online" if has_key else "offline"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from adaptive_mamba.training.config_docs import help_text

    p = argparse.ArgumentParser(description=__doc__, epilog=help_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML or JSON training config: nested sections (keys below; docs/configuration.md)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)          # passed by the deepspeed launcher; LOCAL_RANK is used
    p.add_argument("overrides", nargs="*", help="dotted overrides of config keys, e.g. train.max_steps=100")
    return p.parse_args(argv)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings (the config's deprecation notes) as one line each, without the source line."""
    return f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.formatwarning = one_line_warning
    args = parse_args(argv)
    from adaptive_mamba.training import distributed
    from adaptive_mamba.training.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_with_record(EXIT_BAD_INPUT, str(err))
    ctx = dist_context_from_env()
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGUSR1, request_stop)

    from adaptive_mamba.training.checkpointing import CheckpointCorruptError
    from adaptive_mamba.training.trainer import NonFiniteLossError, Trainer

    distributed.init_distributed(ctx)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)      # concise output: our own log lines, DeepSpeed's warnings only
    trainer = Trainer(cfg, ctx, wandb_mode_from_env(cfg.logging.wandb_mode, cfg.logging.wandb),
                      stop_requested=lambda: stop["signal"] is not None)
    code, message = 0, ""
    try:
        trainer.setup()
        result = trainer.run()
        code = EXIT_PREEMPTED if result.status == "preempted" else 0
    except (ValueError, FileNotFoundError, CheckpointCorruptError, NonFiniteLossError) as err:
        print(f"[rank {ctx.rank}] error: {err}", file=sys.stderr)
        code, message = (EXIT_BAD_INPUT if not isinstance(err, NonFiniteLossError) else EXIT_OTHER), str(err)
    except Exception as err:  # noqa: BLE001  (reported, then exit 1)
        traceback.print_exc()
        code, message = EXIT_OTHER, f"{type(err).__name__}: {err}"
    finally:
        trainer.close()
        del trainer
    sys.stdout.flush()
    sys.stderr.flush()
    exit_with_record(code, message, ctx.rank)      # before the shutdown, which may still abort (DESIGN.md)
    if code not in (0, EXIT_PREEMPTED):
        os._exit(code)          # other ranks may be stuck in a collective: no barrier, leave at once
    distributed.shutdown()
    return code


def exit_with_record(code: int, message: str, rank: int | None = None) -> int:
    """Write this rank's exit record for launch/run.py and slurm/train.sh (when they asked for one); return code."""
    if os.environ.get(EXIT_DIR_ENV):
        if rank is None:        # the config failed before the topology was read
            rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        write_record(os.environ[EXIT_DIR_ENV], rank, code, message)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
