"""Rank-0 monitoring: a W&B run (offline by default), a tqdm bar and concise log lines.

Every other rank gets a `Monitor` whose methods do nothing, so training code calls it unconditionally.

W&B is a side channel and may never cost a checkpoint: every call into it is guarded. The `wandb-core`
service catches SIGTERM itself (so it cannot be shielded by ignoring the signal), and a scheduler's
SIGTERM (scancel, preemption, time limit) reaches it together with the trainer. When any W&B call fails,
the monitor prints one warning, tears the connection down (unregistering W&B's exit hook, which would
otherwise raise at exit) and continues without W&B; metrics.jsonl and checkpoints are unaffected.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

log = logging.getLogger("adaptive_mamba.train")


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, else the peak resident set size (Linux: KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Monitor:
    """W&B + progress bar + log lines on the main rank; silent elsewhere."""

    def __init__(self, enabled: bool, output_dir: str | Path, total_steps: int, initial_step: int,
                 wandb_mode: str, project: str, run_name: Optional[str], config: dict[str, Any],
                 progress_bar: bool = True) -> None:
        self.enabled = enabled
        self.run = None
        self.bar = None
        self.wandb_dir: Optional[Path] = None
        self.run_id: Optional[str] = None
        self.wandb_failed: Optional[str] = None
        if not enabled:
            return
        if not log.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        if wandb_mode != "disabled":
            import wandb

            self.wandb_dir = Path(output_dir).resolve()
            self.wandb_dir.mkdir(parents=True, exist_ok=True)
            self.run_id = _run_id(self.wandb_dir)

            def start() -> None:      # the same run id on every resume: the W&B run continues
                self.run = wandb.init(project=project, name=run_name, config=config, dir=str(self.wandb_dir),
                                      mode=wandb_mode, resume="allow", id=self.run_id)

            self._wandb(start, "init")
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
            sys.stdout.flush()
        else:
            log.info(message)

    def _wandb(self, call: Callable[[], Any], what: str) -> None:
        """Run one W&B call; on any failure warn once, drop the run and carry on without W&B."""
        try:
            call()
        except Exception as err:  # noqa: BLE001  (W&B may fail in any way; training must not)
            self.wandb_failed = f"{what}: {type(err).__name__}: {err}"
            self.run = None
            self.info(f"warning: W&B {what} failed ({type(err).__name__}: {err}); continuing without W&B "
                      "(metrics.jsonl and checkpoints are unaffected)")
            try:
                import wandb

                wandb.teardown()        # unregisters W&B's exit hook even when the service is gone
            except Exception:  # noqa: BLE001
                pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.enabled and self.run is not None:
            self._wandb(lambda: self.run.log(metrics, step=step), "log")

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.enabled and self.run is not None:
            import wandb

            self._wandb(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step), "log")

    def advance(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}" if math.isfinite(loss) else str(loss),
                                 tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.run is not None:
            self._wandb(lambda: self.run.summary.update(values), "summary")

    @property
    def run_dir(self) -> Optional[str]:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            self._wandb(self.run.finish, "finish")
            self.run = None


def _run_id(wandb_dir: Path) -> str:
    """A run id stored in the output dir, so a resumed job continues the same W&B run."""
    path = wandb_dir / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def resume_history(path: Path, step: int) -> list[dict[str, Any]]:
    """The rows of a jsonl history (metrics.jsonl, consistency.jsonl) up to `step`, the step a run restarts from;
    the file is rewritten to hold exactly those rows, so steps replayed after a resume are never recorded twice
    (a fresh run, step 0, starts an empty file)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if r["step"] <= step]
    if path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    return rows
