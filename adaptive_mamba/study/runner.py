"""Execute study runs through the real training entry point and keep one result file per finished run.

A run is `python launch/train.py --config RUN/config.yaml` (or torchrun with `nproc` ranks) in its own
folder `OUT/runs/RUN_ID/`. When it exits 0 its summary and loss curves are collected into
`result.json`, written atomically: a run with a result file is finished and never redone; a run
without one is (re)started, and training's `train.resume=auto` continues it from its last checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from adaptive_mamba.config import AdaptiveMambaConfig
from adaptive_mamba.pillars.masks import MaskConfig
from adaptive_mamba.study.plan import RunSpec, StudySpec, resolve_overrides
from adaptive_mamba.training.checkpointing import latest_checkpoint
from adaptive_mamba.training.config import OptimConfig, nest

RESULT_FILE = "result.json"


class RunFailed(RuntimeError):
    """A training run exited non-zero; the message holds the end of its log."""


@dataclass
class RunContext:
    """Everything a run needs besides its RunSpec."""

    spec: StudySpec
    mode: str
    out: Path
    repo: Path                                  # where launch/train.py lives
    data: dict[str, Path]                       # regime -> token-shard folder
    base_model: Optional[Path] = None           # the cached pre-trained model (fine-tuning regime)
    project: str = "adaptive-mamba-study"
    epochs: Optional[int] = None                # train each run for this many epochs instead of max_steps
    nproc: int = 1
    env: dict[str, str] = field(default_factory=dict)

    def run_dir(self, run_id: str) -> Path:
        return self.out / "runs" / run_id


def atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished run's result under OUT/runs, by run id."""
    results = {}
    for path in sorted((out / "runs").glob(f"*/{RESULT_FILE}")):
        data = json.loads(path.read_text())
        results[data["run_id"]] = data
    return results


def train_config(run: RunSpec, ctx: RunContext, overrides: Mapping[str, Any], lr_scale: float) -> dict[str, Any]:
    """The dotted TrainConfig keys of one run: shared settings < mode < regime < arm (+ grid point)."""
    mode = ctx.spec.mode(ctx.mode)
    cfg: dict[str, Any] = {**ctx.spec.train, **mode.get("train", {}), **ctx.spec.regimes[run.regime], **overrides}
    cfg.update({"train.seed": run.seed, "data.dir": str(ctx.data[run.regime]),
                "train.output_dir": str(ctx.run_dir(run.run_id) / "train"), "logging.project": ctx.project,
                "logging.run_name": run.run_id})
    cfg["optim.lr"] = float(cfg.get("optim.lr", OptimConfig.lr)) * lr_scale
    if run.regime == "finetune":
        if ctx.base_model is None:
            raise ValueError("the fine-tuning regime needs the cached base model")
        cfg["train.init_from"] = str(ctx.base_model)
        cfg["train.freeze_base"] = bool(cfg.get("peft.enabled"))   # PEFT arms adapt a frozen base; others train it all
        for key in ("model.d_model", "model.n_layer"):             # the base model fixes the architecture
            cfg.pop(key, None)
    if ctx.epochs is not None:
        cfg.update({"train.num_epochs": ctx.epochs, "train.max_steps": 0})
    return cfg


def model_shape(run: RunSpec, ctx: RunContext, cfg: Mapping[str, Any]) -> AdaptiveMambaConfig:
    """The architecture a run trains (the base model's in fine-tuning), for parameter matching. The vocabulary
    size does not enter LoRA's count on the mixer projections, so a from-scratch shape uses the default."""
    if run.regime == "finetune":
        return AdaptiveMambaConfig.from_dict(json.loads((ctx.base_model / "config.json").read_text()))
    return AdaptiveMambaConfig(d_model=int(cfg["model.d_model"]), n_layer=int(cfg["model.n_layer"]))


def write_run_config(cfg: Mapping[str, Any], path: Path) -> None:
    """The config file of a run: the sections of training's YAML, from the dotted keys of `cfg`."""
    path.write_text(yaml.safe_dump(nest(cfg), sort_keys=True))


def launch_command(ctx: RunContext, config_file: Path) -> list[str]:
    train = str(ctx.repo / "launch" / "train.py")
    if ctx.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ctx.nproc),
                train, "--config", str(config_file)]
    return [sys.executable, train, "--config", str(config_file)]


def launch(ctx: RunContext, cfg: Mapping[str, Any], run_dir: Path, name: str) -> None:
    """Write RUN_DIR/config.yaml (nested sections from the dotted keys of `cfg`) and train it, appending the output
    to RUN_DIR/train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    write_run_config(cfg, config_file)
    log_file = run_dir / "train.log"
    env = {**os.environ, "WANDB_RUN_GROUP": f"{ctx.out.name}-{ctx.mode}", **ctx.env}
    env.setdefault("WANDB_MODE", "offline")
    with log_file.open("a") as log:
        code = subprocess.call(launch_command(ctx, config_file), stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=ctx.repo)
    if code != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RunFailed(f"{name} exited with status {code}; the end of {log_file}:\n{tail}")


def execute(run: RunSpec, ctx: RunContext, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Train one run (resuming its own checkpoint if it was interrupted) and write its result file."""
    targets = ctx.spec.train.get("masks.targets", MaskConfig.targets)
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    base_cfg = train_config(run, ctx, run.overrides, 1.0)
    overrides, lr_scale, notes = resolve_overrides(run, results, model_shape(run, ctx, base_cfg), targets)
    cfg = train_config(run, ctx, overrides, lr_scale)
    run_dir, train_dir = ctx.run_dir(run.run_id), Path(cfg["train.output_dir"])
    if train_dir.exists() and latest_checkpoint(train_dir) is None:
        shutil.rmtree(train_dir)            # interrupted before its first checkpoint: start it again cleanly
    launch(ctx, cfg, run_dir, f"run {run.run_id}")
    result = collect(run, train_dir, overrides, lr_scale, notes)
    atomic_write_json(run_dir / RESULT_FILE, result)
    return result


def collect(run: RunSpec, train_dir: Path, overrides: Mapping[str, Any], lr_scale: float,
            notes: Mapping[str, Any]) -> dict[str, Any]:
    """One run's measured numbers, from the trainer's summary.json and metrics.jsonl."""
    summary_file = train_dir / "summary.json"
    if not summary_file.is_file():
        raise RunFailed(f"run {run.run_id} finished without {summary_file}")
    summary = json.loads(summary_file.read_text())
    steps = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed, time_curve = 0.0, []
    for rec in steps:
        tokens_per_step = summary["tokens"] / max(1, summary["steps"])
        elapsed += tokens_per_step / max(rec["tokens_per_s"], 1e-9)
        time_curve.append(round(elapsed, 4))
    eval_loss = summary.get("eval_loss_last")
    return {
        **run.to_dict(), "overrides": dict(overrides), "lr_scale": lr_scale, "notes": dict(notes),
        "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50)) if eval_loss is not None else None,
        "eval_curve": summary.get("evals", []),
        "train_curve": [[rec["step"], rec["ce"]] for rec in steps], "time_curve": time_curve,
        "steps": summary["steps"], "tokens": summary["tokens"], "seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"], "peak_memory_mb": summary["peak_memory_mb"],
        "trainable_params": summary.get("trainable_params"), "total_params": summary.get("total_params"),
        "sparsity": summary.get("sparsity"), "module_sparsity": summary.get("module_sparsity", {}),
        "flops_forward_per_token": summary.get("flops_eval_forward"),
        "flops_train_per_token": summary.get("flops_train_step"),
        "flops_export_per_token": summary.get("flops_export_forward"),
        "allocation": summary.get("allocation"), "allocation_history": summary.get("allocation_history", []),
    }
