"""The training loop: DeepSpeed engine, long-sequence batches, the three pillars, checkpoints, monitoring.

One optimizer step = `grad_accum_steps` micro-batches on every rank. Micro-batch m of the run reads
data step m of epoch m // steps_per_epoch (a pure function of the seed), so the data position is the
global step and a resumed run sees exactly the batches an uninterrupted run would.

Pillar refreshes (every `scan_update_frequency` / `peft_reallocation_frequency` optimizer steps)
are collectives: statistics are all-reduced, rank 0 decides, the decision is broadcast and applied
on every rank (see `adaptation.py`).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from adaptive_mamba.checkpoint_io import load_config
from adaptive_mamba.chunked import chunked_lm_loss
from adaptive_mamba.context_parallel import context_parallel_loss
from adaptive_mamba.data import TokenShards
from adaptive_mamba.model import AdaptiveMambaForCausalLM, parameter_counts
from adaptive_mamba.training import checkpointing as ckpt
from adaptive_mamba.training.adaptation import PillarController
from adaptive_mamba.training.config import TrainConfig
from adaptive_mamba.training.data_setup import check_tokenizer, make_sampler, prepare_shards
from adaptive_mamba.training.distributed import (DistContext, all_gather_object, all_reduce_sum, any_rank, barrier,
                                                 context_parallel_groups)
from adaptive_mamba.training.engine import (build_engine, deepspeed_config, full_state_dict, load_optimizer_state,
                                            optimizer_state, permute_engine_params, zero_stage)
from adaptive_mamba.training.monitoring import Monitor, peak_memory_mb, resume_history

EXIT_PREEMPTED = 99


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def whole_sequence_loss(model: AdaptiveMambaForCausalLM, input_ids: Tensor, labels: Tensor) -> Tensor:
    return model(input_ids, labels=labels, return_logits=False).loss


def sequence_loss(cfg: TrainConfig, cp_group: Any = None) -> Callable[[AdaptiveMambaForCausalLM, Tensor, Tensor], Tensor]:
    """The cross-entropy of a batch: in one pass, in chunks of chunk_len (exact), or this rank's piece under
    context parallelism, scaled by its size because DeepSpeed averages gradients over all ranks."""
    cp, chunk = cfg.train.context_parallel, cfg.train.chunk_len
    if cp > 1:
        return lambda model, ids, labels: context_parallel_loss(model, ids, labels, cp_group) * cp
    if chunk:
        return lambda model, ids, labels: (chunked_lm_loss(model, ids, labels, chunk)
                                           if ids.shape[1] > chunk else whole_sequence_loss(model, ids, labels))
    return whole_sequence_loss


class TrainingObjective(nn.Module):
    """model + the pillars' regulariser in one forward, so ZeRO-3 gathers every parameter it touches."""

    def __init__(self, model: AdaptiveMambaForCausalLM, regularizer: Callable[[nn.Module], Tensor],
                 loss: Callable[[AdaptiveMambaForCausalLM, Tensor, Tensor], Tensor] = whole_sequence_loss) -> None:
        super().__init__()
        self.model = model
        self._regularizer = regularizer
        self._loss = loss
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for name, p in model.named_parameters():   # read by the regulariser outside their module's forward
            if "mask_logits" in name:
                register_external_parameter(self, p)

    def forward(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(cross-entropy, regulariser) of one batch; the logits are never materialised."""
        return self._loss(self.model, input_ids, labels), self._regularizer(self.model)


@dataclass
class StepRecord:
    step: int
    loss: float
    ce: float
    reg: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


@dataclass
class RunResult:
    """What a run did; `status` is "completed" or "preempted" (checkpoint saved, exit 99)."""

    status: str
    step: int
    checkpoint: Optional[str]
    summary: dict[str, Any] = field(default_factory=dict)


def _grad_norm(module: nn.Module) -> float:
    """L2 norm of the (already all-reduced) gradients before clipping, as ZeRO-1/2/3 report it."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.lr * optim.min_lr_ratio (or constant)."""
    if cfg.optim.warmup_steps and step < cfg.optim.warmup_steps:
        return cfg.optim.lr * (step + 1) / cfg.optim.warmup_steps
    if cfg.optim.schedule == "constant":
        return cfg.optim.lr
    span = max(1, total_steps - cfg.optim.warmup_steps)
    progress = min(1.0, (step - cfg.optim.warmup_steps) / span)
    floor = cfg.optim.lr * cfg.optim.min_lr_ratio
    return floor + 0.5 * (cfg.optim.lr - floor) * (1 + math.cos(math.pi * progress))


class Trainer:
    """Set up with a TrainConfig and this process's DistContext; `run()` trains and returns a RunResult.

    `stop_requested` is polled after every optimizer step (the launcher sets it from SIGTERM/SIGUSR1);
    all ranks agree on it, finish the step, save a checkpoint and return status "preempted".
    It is the `adaptation.TrainingRun` the pillar controller works on (model, partitioned, full_model,
    permute_parameters, rebuild_engine, upcoming_batches, device)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, wandb_mode: str = "offline",
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.cfg, self.ctx, self.wandb_mode = cfg, ctx, wandb_mode
        self.stop_requested = stop_requested
        self.output_dir = Path(cfg.train.output_dir)
        self.device = ctx.device()
        self.engine = None
        self.monitor: Optional[Monitor] = None
        self.history: list[StepRecord] = []
        self.evals: list[tuple[int, float]] = []

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from = ckpt.resolve_resume(cfg.train.resume, self.output_dir)
        resume_state = ckpt.verify_checkpoint(self.resume_from) if self.resume_from is not None else None
        self.ds_config = deepspeed_config(cfg, ctx.world_size)
        if cfg.train.chunk_len and zero_stage(self.ds_config) == 3:
            raise ValueError("train.chunk_len needs ZeRO stage 0-2 (its backward returns whole-parameter gradients; ZeRO-3 "
                             "partitions them): use train.zero_stage=2, or train.chunk_len=0")
        self.cp_group, self.dp_rank = None, ctx.rank
        if cfg.train.context_parallel > 1:
            self.cp_group, self.dp_rank, _ = context_parallel_groups(cfg.train.context_parallel)
        data_dir = prepare_shards(cfg, ctx)
        self.train_shards = TokenShards(data_dir, "train")
        self.val_shards = TokenShards(data_dir, "val")
        self.tokenizer_hash = check_tokenizer(self.train_shards, cfg, self.resume_from, resume_state)
        self.sampler = make_sampler(self.train_shards, cfg, ctx, train=True)
        self.val_sampler = make_sampler(self.val_shards, cfg, ctx, train=False) if len(self.val_shards) else None
        self.micro_per_epoch = self.sampler.steps_per_epoch(0)
        steps_per_epoch = self.micro_per_epoch // cfg.train.grad_accum_steps
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.num_epochs * steps_per_epoch
        t = cfg.train
        self.tokens_per_step = ctx.world_size // t.context_parallel * t.batch_size * t.grad_accum_steps * t.seq_len

        self.pillars = PillarController(cfg, ctx, self.total_steps)
        if resume_state is not None:
            if resume_state["data"]["world_size"] != ctx.world_size:
                raise ValueError(f"cannot resume {self.resume_from}: it was written by {resume_state['data']['world_size']} "
                                 f"ranks, this run has {ctx.world_size}; the data order depends on the world size")
            self.sampler.load_state_dict(resume_state["data"])
            self.pillars.load_state_dict(resume_state["pillars"])
        self.model_config = self._model_config()
        model = self._fresh_model().to(self.device)
        self.step = 0
        initial = self.pillars.initial_allocation(model, self.upcoming_batches()) if resume_state is None else None
        self.rebuild_engine(model)
        if resume_state is not None:
            self._load(self.resume_from, resume_state)
        else:
            torch.manual_seed(cfg.train.seed + 1000 * self.dp_rank)   # mask noise differs per sequence, like data
        self.monitor = Monitor(ctx.is_main, self.output_dir, self.total_steps, self.step, self.wandb_mode,
                               cfg.logging.project, cfg.logging.run_name, cfg.to_dict(), cfg.logging.progress_bar)
        self._metrics_file = self.output_dir / "metrics.jsonl"
        if ctx.is_main:    # the whole run's history, also across resumes (exactly one row per step)
            resume_history(self.output_dir / "consistency.jsonl", self.step)
            self.history = [StepRecord(**{k: r.get(k, 0) for k in StepRecord.__dataclass_fields__})
                            for r in resume_history(self._metrics_file, self.step)]
        if initial is not None:
            if self.cfg.train.verify_ranks and initial.get("decisions"):
                self.verify_ranks("+".join(initial["decisions"]))
            self._log_events(initial, step=0)
        mode = "fine-tune from " + cfg.train.init_from if cfg.train.init_from else "from scratch"
        self.monitor.info(
            f"model {mode}: d_model={self.model_config.d_model} n_layer={self.model_config.n_layer} "
            f"vocab={self.model_config.vocab_size}, {parameter_counts(self.model)[1]:,} parameters; "
            f"{ctx.world_size} rank(s) on {self.device.type}, ZeRO-{zero_stage(self.ds_config)}, "
            f"{cfg.train.precision}, seq_len {cfg.train.seq_len}"
            + (f" in chunks of {cfg.train.chunk_len}" if cfg.train.chunk_len else "")
            + (f" split over {cfg.train.context_parallel} context-parallel ranks" if cfg.train.context_parallel > 1
               else "")
            + f", activation checkpointing {'on' if self.model_config.gradient_checkpointing else 'off'}, "
            f"{self.total_steps} steps of {self.tokens_per_step:,} tokens"
            + (f"; resumed from {self.resume_from} at step {self.step}" if self.resume_from else ""))

    def _model_config(self):
        cfg = self.cfg
        if cfg.train.init_from is not None:
            config, _ = load_config(cfg.train.init_from)         # the weights are read once, in _fresh_model
        else:
            config = cfg.model_config(self.train_shards.vocab_size)
        config.gradient_checkpointing = cfg.use_gradient_checkpointing
        if config.vocab_size < self.train_shards.vocab_size:
            raise ValueError(f"the model's vocab_size {config.vocab_size} is smaller than the data's tokenizer "
                             f"({self.train_shards.vocab_size} ids in {self.train_shards.path}): tokenise the data with "
                             "the model's own tokenizer")
        return config

    def _fresh_model(self) -> AdaptiveMambaForCausalLM:
        """The model with the current pillar structure (masks, adapters); weights: init or pretrained."""
        torch.manual_seed(self.cfg.train.seed)
        if self.cfg.train.init_from is not None:
            model = AdaptiveMambaForCausalLM.from_pretrained(self.cfg.train.init_from)
            model.config.gradient_checkpointing = self.cfg.use_gradient_checkpointing
        else:
            model = AdaptiveMambaForCausalLM(copy.deepcopy(self.model_config))
        if self.cfg.freeze_base_weights:
            model.requires_grad_(False)
        return self.pillars.build_structure(model)

    def rebuild_engine(self, model: AdaptiveMambaForCausalLM) -> None:
        """(Re)create the DeepSpeed engine and optimizer around `model` (at setup, and after the pillars changed
        which parameters train). A rebuild carries the Adam moments and group steps of every parameter that
        survives it from the old optimizer to the new one."""
        model.to(self.device)
        objective = TrainingObjective(model, self.pillars.regularizer, sequence_loss(self.cfg, self.cp_group))
        carried = None
        if self.engine is not None:
            carried = optimizer_state(self.engine)
            self.engine.destroy()
            self.engine = None
            gc.collect()
        self.engine = build_engine(objective, self.cfg, self.ds_config)
        if carried is not None:
            load_optimizer_state(self.engine, carried)
        self.pillars.attach(self.model)

    @property
    def module(self) -> TrainingObjective:
        return self.engine.module

    @property
    def model(self) -> AdaptiveMambaForCausalLM:
        """The engine's live model (partitioned under ZeRO-3)."""
        return self.module.model

    @property
    def partitioned(self) -> bool:
        return zero_stage(self.ds_config) == 3

    def permute_parameters(self, plan: Iterable[tuple[str, Callable[[Tensor], Tensor]]]) -> None:
        """engine.permute_engine_params for parameters of `model` (named without the objective's "model." prefix):
        parameters, fp32 masters and Adam moments, at any ZeRO stage (collective)."""
        permute_engine_params(self.engine, [(f"model.{name}", fn) for name, fn in plan])

    # -------------------------------------------------------------------------------------- the loop
    def _batch(self, micro_index: int) -> dict[str, Tensor]:
        epoch, step = divmod(micro_index, self.micro_per_epoch)
        batch = self.sampler.batch_at(step, epoch)
        self.sampler.epoch, self.sampler.step = epoch, step + 1
        return {k: v.to(self.device) for k, v in batch.items()}

    def upcoming_batches(self) -> list[tuple[Tensor, Tensor]]:
        """(input_ids, labels) on CPU of this rank's micro-batches of the next optimizer step, without advancing the
        data (pillar 3 computes gradient saliency on the step's global batch: these, on every rank)."""
        out = []
        for j in range(self.cfg.train.grad_accum_steps):
            epoch, step = divmod(self.step * self.cfg.train.grad_accum_steps + j, self.micro_per_epoch)
            batch = self.sampler.batch_at(step, epoch)
            out.append((batch["input_ids"], batch["labels"]))
        return out

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def train_step(self) -> StepRecord:
        """One optimizer step over grad_accum_steps micro-batches on every rank."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.engine.train()
        lr = lr_at(self.step, cfg, self.total_steps)
        self._set_lr(lr)
        self.pillars.on_step_begin(self.model, self.step)
        sums = torch.zeros(4, dtype=torch.float64)        # ce, reg, tokens, non-finite count
        own_norm = None
        for j in range(cfg.train.grad_accum_steps):
            batch = self._batch(self.step * cfg.train.grad_accum_steps + j)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self._noise_seed(j))
                ce, reg = self.engine(batch["input_ids"], batch["labels"])
                loss = ce + reg
                if any_rank(not torch.isfinite(loss.detach()).item()):
                    self._fail_non_finite(float(loss.detach()))
                self.engine.backward(loss)
            if j == cfg.train.grad_accum_steps - 1 and zero_stage(self.ds_config) == 0:
                own_norm = _grad_norm(self.module)    # DeepSpeed reports no norm for a plain torch optimizer
            self.engine.step()
            # a context-parallel group shares a batch
            tokens = float((batch["labels"][:, 1:] != -100).sum()) / cfg.train.context_parallel
            sums += torch.tensor([float(ce.detach()), float(reg.detach()), tokens, 0.0], dtype=torch.float64)
        self.step += 1
        sums = all_reduce_sum([sums])[0]
        n = cfg.train.grad_accum_steps * self.ctx.world_size
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else norm
        ce_mean, reg_mean = sums[0].item() / n, sums[1].item() / n
        return StepRecord(self.step, ce_mean + reg_mean, ce_mean, reg_mean, lr,
                          float(norm) if norm is not None else float("nan"), int(sums[2].item()),
                          time.perf_counter() - t0)

    def _noise_seed(self, micro: int) -> int:
        """The seed of every random draw (mask noise) of micro-batch `micro` of this step on this rank: a function of
        (seed, step, slot) alone, so evaluation, reports and refreshes between steps never shift it, at any ZeRO
        stage and across a resume. The slot rank * grad_accum_steps + micro names the micro-batch's place in the
        step's global batch: 2 ranks draw what 1 process with twice the accumulation draws."""
        slot = self.dp_rank * self.cfg.train.grad_accum_steps + micro     # context-parallel ranks share a sequence
        digest = hashlib.sha256(f"mask-noise/{self.cfg.train.seed}/{self.step}/{slot}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def _fail_non_finite(self, loss: float) -> None:
        good = ckpt.latest_checkpoint(self.output_dir)
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at optimizer step {self.step + 1}: training stopped before applying this step, "
            f"and no checkpoint was written from it. Last checkpoint: {good or 'none (train.save_every=0)'} (if the "
            "weights there already diverged, train.resume=PATH from an earlier one in the same folder). Lower "
            "optim.lr (or raise optim.warmup_steps / lower optim.grad_clip) and restart")

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation cross-entropy over eval_batches batches per rank (token-weighted across ranks)."""
        if self.val_sampler is None:
            return None
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        n_steps = min(self.cfg.eval.batches, self.val_sampler.steps_per_epoch(0))
        # eval mode: the scan-order statistics hook skips these forwards (training batches only)
        for s in range(n_steps):
            batch = {k: v.to(self.device) for k, v in self.val_sampler.batch_at(s, 0).items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            if count == 0:
                continue
            ce, _ = self.engine(batch["input_ids"], batch["labels"])
            sums += torch.tensor([float(ce) * count, count], dtype=torch.float64)
        sums = all_reduce_sum([sums])[0]
        self.engine.train()
        return None if sums[1] == 0 else float(sums[0] / sums[1])

    def run(self) -> RunResult:
        """Train to total_steps (or until a stop request), with refreshes, evals and checkpoints.

        Each step's collectives (pillar refreshes, eval, the stop vote, a checkpoint) come before its metrics are
        logged, so on a stop request the checkpoint is on disk before anything touches W&B."""
        cfg, mon = self.cfg, self.monitor
        if self.step >= self.total_steps:
            mon.info(f"the run in {self.output_dir} already reached step {self.step} of {self.total_steps}: nothing to "
                     "train; summary.json and the checkpoints are left as they are (raise max_steps to continue, or "
                     "use a new train.output_dir / train.resume=none to start over)")
            return RunResult("completed", self.step, str(self.resume_from))
        if self.step == 0:
            self._log_eval(self._evaluate_and_inspect())
        status, last_ckpt = "completed", None
        while self.step < self.total_steps:
            rec = self.train_step()
            self.history.append(rec)
            events = self.pillars.maybe_refresh(self, rec.step)
            if self.cfg.train.verify_ranks and events.get("decisions"):
                self.verify_ranks("+".join(events["decisions"]))
            evaluation = None
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                evaluation = self._evaluate_and_inspect()
            stop = any_rank(self.stop_requested())
            every = cfg.train.save_every
            if stop or (every and self.step % every == 0 and self.step < self.total_steps):
                last_ckpt = self.save()
            self._log_step(rec, events)
            self._log_eval(evaluation)
            if stop:
                status = "preempted"
                break
        if status == "preempted":
            mon.info(f"preempted at step {self.step}: checkpoint saved to {last_ckpt}; rerun with train.resume=auto "
                     f"(exit status {EXIT_PREEMPTED})")
            return RunResult(status, self.step, str(last_ckpt))
        self._log_eval(self._evaluate_and_inspect())
        if self.cfg.train.verify_ranks:
            self.verify_ranks("end")
        last_ckpt = self.save()
        summary = self._summary(last_ckpt)
        if cfg.train.export_at_end:
            summary["export_dir"] = str(self.export())
        mon.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        if self.ctx.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        mon.info(summary["text"])
        return RunResult(status, self.step, str(last_ckpt), summary)

    def _log_step(self, rec: StepRecord, events: dict[str, Any]) -> None:
        """Metrics (metrics.jsonl, W&B), pillar tables and lines, progress bar, log line."""
        tok_s = rec.tokens / max(rec.seconds, 1e-9)
        metrics = {"train/loss": rec.loss, "train/ce": rec.ce, "train/regularizer": rec.reg, "train/lr": rec.lr,
                   "train/grad_norm": rec.grad_norm, "perf/tokens_per_s": tok_s,
                   "perf/peak_memory_mb": peak_memory_mb(), "perf/step_seconds": rec.seconds}
        if self.ctx.is_main:
            with self._metrics_file.open("a") as f:
                f.write(json.dumps({**dataclasses.asdict(rec), "tokens_per_s": tok_s}) + "\n")
        self._log_events(events, rec.step, metrics)
        self.monitor.advance(rec.step, rec.loss, tok_s)
        if rec.step % self.cfg.logging.every == 0 or rec.step == self.total_steps:
            self.monitor.info(f"step {rec.step}/{self.total_steps} loss {rec.loss:.4f} (ce {rec.ce:.4f} + reg "
                              f"{rec.reg:.4f}) lr {rec.lr:.2e} grad_norm {rec.grad_norm:.3f} {tok_s:,.0f} tok/s "
                              f"peak {peak_memory_mb():,.0f} MiB")

    def _log_events(self, events: dict[str, Any], step: int, metrics: Optional[dict[str, Any]] = None) -> None:
        """`metrics` and a pillar refresh's metrics, tables and lines (the ranks were verified after a decision)."""
        metrics = {**(metrics or {}), **events.get("metrics", {})}
        if metrics:
            self.monitor.log(metrics, step=step)
        for table in events.get("tables", []):
            self.monitor.log_table(*table, step=step)
        for line in events.get("lines", []):
            self.monitor.info(line)

    def verify_ranks(self, tag: str) -> str:
        """Digest of every parameter (gathered, fp32 masters), the scan order and the allocation on each rank;
        rank 0 checks they agree and appends them to consistency.jsonl. Raises if the ranks diverged."""
        h = hashlib.sha256()
        param_names = {name for name, _ in self.module.named_parameters()}
        for name, tensor in sorted(full_state_dict(self.engine).items()):
            if name in param_names:
                h.update(name.encode())
                h.update(tensor.detach().float().contiguous().numpy().tobytes())
        extra = self.model.config.extra
        h.update(json.dumps({"scan_order": extra.get("scan_order"), "allocation": self.pillars.allocation},
                            sort_keys=True).encode())
        digests = all_gather_object(h.hexdigest())
        if self.ctx.is_main:
            with (self.output_dir / "consistency.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, "tag": tag, "digests": digests}) + "\n")
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks diverged after {tag} at step {self.step}: parameter/pillar digests {digests}")
        return digests[0]

    def _evaluate_and_inspect(self) -> Optional[tuple[int, float, dict[str, Any]]]:
        """(step, validation loss, pillar report) now (collective), recorded in self.evals; None without val data."""
        loss = self.evaluate()
        if loss is None:
            return None
        self.evals.append((self.step, loss))
        return self.step, loss, self.pillars.inspect(self)

    def _log_eval(self, evaluation: Optional[tuple[int, float, dict[str, Any]]]) -> None:
        if evaluation is None:
            return
        step, loss, report = evaluation
        self.monitor.log({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50)), **report["metrics"]},
                         step=step)
        self.monitor.info(f"eval at step {step}: loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f})"
                          + (f"; {report['line']}" if report.get("line") else ""))

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """A complete checkpoint of this step (collective)."""
        trainer_state = {"step": self.step, "total_steps": self.total_steps, "data": self.sampler.state_dict(),
                         "pillars": self.pillars.state_dict(), "config": self.cfg.to_dict(),
                         "evals": self.evals, "world_size": self.ctx.world_size,
                         "tokenizer_sha256": self.tokenizer_hash}
        rank_state = {"rng": ckpt.rng_state(), "pillars": self.pillars.rank_state_dict()}
        path = ckpt.save_checkpoint(self.engine, self.output_dir, self.step, trainer_state, rank_state,
                                    self.ctx.rank, self.cfg.train.keep_last)
        if self.monitor is not None:
            self.monitor.info(f"checkpoint saved: {path}")
        return path

    def _load(self, directory: Path, state: dict[str, Any]) -> None:
        load_path, _ = self.engine.load_checkpoint(str(directory / ckpt.ENGINE_DIR), tag=ckpt.ENGINE_TAG,
                                                   load_module_strict=True, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise ckpt.CheckpointCorruptError(f"DeepSpeed could not load the engine state in {directory}")
        rank_path = ckpt.rank_file(directory, self.ctx.rank)
        if not rank_path.is_file():
            raise ckpt.CheckpointCorruptError(f"{rank_path} is missing: the checkpoint was written by fewer ranks")
        rank_state = torch.load(rank_path, map_location="cpu", weights_only=False)
        self.step = int(state["step"])
        self.evals = [tuple(e) for e in state.get("evals", [])]
        ckpt.set_rng_state(rank_state["rng"])
        self.pillars.load_rank_state_dict(rank_state["pillars"])

    # -------------------------------------------------------------------------------------- exports
    def full_model(self) -> AdaptiveMambaForCausalLM:
        """A plain CPU copy of the current model (pillar structure included), gathered from every rank."""
        state = full_state_dict(self.engine)
        model = self.pillars.build_structure(self._plain_base())
        model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                              strict=True)
        return model

    def _plain_base(self) -> AdaptiveMambaForCausalLM:
        model = AdaptiveMambaForCausalLM(copy.deepcopy(self.model_config))
        if self.cfg.freeze_base_weights:
            model.requires_grad_(False)
        return model

    def export(self) -> Path:
        """`export/adapters` (peft format, when adapters exist) and `export/merged` (plain model + tokenizer)."""
        out = self.output_dir / "export"
        model = self.full_model()
        if self.ctx.is_main:
            paths = self.pillars.export(model, out)
            self.train_shards.tokenizer().save(out / "merged")
            self.monitor.info("exported: " + ", ".join(str(p) for p in paths))
        barrier()
        return out

    # ---------------------------------------------------------------------------------------- summary
    def _summary(self, checkpoint: Path) -> dict[str, Any]:
        """The whole run (every segment of a resumed run): tokens and seconds are summed over its optimizer steps."""
        first, last = (self.history[0], self.history[-1]) if self.history else (None, None)
        tokens, elapsed = sum(h.tokens for h in self.history), sum(h.seconds for h in self.history)
        tok_s = tokens / max(elapsed, 1e-9)
        report = self.pillars.final_report(self)
        summary: dict[str, Any] = {
            "steps": self.step, "tokens": tokens, "seconds": round(elapsed, 1), "tokens_per_s": round(tok_s, 1),
            "train_loss_first": first.loss if first else None, "train_loss_last": last.loss if last else None,
            "eval_loss_first": self.evals[0][1] if self.evals else None,
            "eval_loss_last": self.evals[-1][1] if self.evals else None,
            "evals": [list(e) for e in self.evals],
            "peak_memory_mb": round(peak_memory_mb(), 1), "checkpoint": str(checkpoint),
            "wandb_dir": self.monitor.run_dir if self.monitor else None, **report["values"]}
        loss_part = (f"train loss {first.loss:.3f} -> {last.loss:.3f}" if first else "no steps run")
        if len(self.evals) >= 2:
            loss_part += f", validation loss {self.evals[0][1]:.3f} -> {self.evals[-1][1]:.3f}"
        summary["text"] = (
            f"Summary: {self.step} optimizer steps on {self.ctx.world_size} rank(s) ({self.device.type}) processed "
            f"{tokens:,} tokens in {elapsed:.1f} s ({tok_s:,.0f} tokens/s, peak memory {peak_memory_mb():,.0f} MiB "
            f"per rank); {loss_part}. {report['text']} Checkpoint: {checkpoint}."
            + (f" W&B run (offline; upload with `wandb sync {summary['wandb_dir']}`): {summary['wandb_dir']}."
               if summary["wandb_dir"] and self.wandb_mode == "offline" else
               (f" W&B run: {summary['wandb_dir']}." if summary["wandb_dir"] else "")))
        return summary

    def close(self) -> None:
        """Drop the engine and the W&B run (call before distributed.shutdown())."""
        if self.monitor is not None:
            self.monitor.close()
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        gc.collect()
