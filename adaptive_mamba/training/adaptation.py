"""The three pillars inside distributed training: collect, all-reduce, decide (rank 0, or the ranks' shares),
broadcast or exchange, apply.

- Pillar 1 (scan order): every rank's `ScanStatsCollector` accumulates statistics of the scan input;
  every `scan_update_frequency` steps they are all-reduced (float64 sums), the ranks decide the
  layers' permutations (a share each, then exchanged), and every rank permutes parameters, fp32 master
  copies and Adam moments through DeepSpeed's safe_get/set API (any ZeRO stage).
- Pillar 2 (masks): applied when the model is built; the regulariser runs inside the training forward
  (its mask logits are registered as ZeRO-3 external parameters); the temperature follows the schedule.
- Pillar 3 (hybrid PEFT): at `first_allocation_step` (0 when fine-tuning: before the first step, so
  adapters train from the start instead of only mask logits) and then every `peft_reallocation_frequency`
  steps the full model is gathered, importance (gradient saliency on this rank's next batch, or the mask
  activation history) is computed on every rank and averaged, rank 0 decides (modules whose hard mask
  keeps nothing stay frozen), broadcasts, every rank applies the allocation and the engine is rebuilt with
  the Adam state of every surviving parameter carried over (engine.load_optimizer_state).
  peft_mode lora / ia3 put that adapter on every target once, at build time; full trains every weight.

The model's structure (masks, adapters) is a function of this controller's state, so a checkpoint
rebuilds it before loading weights.

The controller reaches the training run only through `TrainingRun` (the trainer implements it): the live model,
a gathered copy, permuting parameters with their optimizer state, rebuilding the engine, the next step's batches.
It never imports the trainer.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
from torch import Tensor, nn

from adaptive_mamba.model import AdaptiveMambaForCausalLM, parameter_counts
from adaptive_mamba.pillars.common import iter_projections, resolve_module
from adaptive_mamba.pillars.hybrid_peft import (AllocationDecision, adapter_kind, apply_allocation,
                                                decide_allocation, detach_adapter, format_allocation_table,
                                                module_importance, pruned_modules, uniform_allocation)
from adaptive_mamba.flops import model_flops
from adaptive_mamba.pillars.masks import (MaskedLinear, apply_masks, compile_masks, mask_regularizer,
                                          set_temperature, sparsity_report, temperature_at)
from adaptive_mamba.pillars.persistence import save_adaptive_model
from adaptive_mamba.pillars.scan_order import (ScanStatsCollector, current_scan_order,
                                               decide_scan_order, reorder_block_sizes, reparametrization_plan)
from adaptive_mamba.training.config import TrainConfig
from adaptive_mamba.training.distributed import DistContext, all_gather_object, all_reduce_sum, broadcast_object

SALIENCY_MAX_TOKENS = 8192      # gradient saliency reads at most this many tokens of each sequence (memory bound)


class TrainingRun(Protocol):
    """The operations the pillar controller performs on a training run (implemented by the trainer). The
    collective ones must be called on every rank."""

    device: torch.device

    @property
    def model(self) -> AdaptiveMambaForCausalLM:
        """The engine's live model (its parameters are partitioned when `partitioned`)."""

    @property
    def partitioned(self) -> bool:
        """Whether the live model's parameters are partitioned across ranks (ZeRO-3)."""

    def full_model(self) -> AdaptiveMambaForCausalLM:
        """A plain CPU copy of the current model with full parameters (collective)."""

    def permute_parameters(self, plan: Iterable[tuple[str, Callable[[Tensor], Tensor]]]) -> None:
        """Rewrite each named parameter of `model` as fn(parameter), with its fp32 master copy and Adam moments
        (collective)."""

    def rebuild_engine(self, model: AdaptiveMambaForCausalLM) -> None:
        """Train `model` from now on, carrying the optimizer state of every surviving parameter (collective)."""

    def upcoming_batches(self) -> list[tuple[Tensor, Tensor]]:
        """This rank's (input_ids, labels) micro-batches of the next optimizer step, on CPU."""


class PillarController:
    """Owns the pillars' configuration, decisions and statistics for one training run."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, total_steps: int) -> None:
        self.cfg, self.ctx, self.total_steps = cfg, ctx, total_steps
        anneal = cfg.masks.anneal_steps or max(1, total_steps)          # None: the whole run
        self.mask_cfg = dataclasses.replace(cfg.masks, anneal_steps=anneal) if cfg.masks.enabled else None
        self.peft_cfg = cfg.peft if cfg.peft.enabled and cfg.peft.mode != "full" else None
        if self.peft_cfg is not None:
            # peft (seconds; it imports transformers) is imported here, before W&B starts, not at the first
            # allocation: there a stop signal's checkpoint would wait on it, and W&B's import hook, which reports
            # transformers to W&B's service, raises once SIGTERM has killed that service.
            import peft  # noqa: F401
        self.scan_decisions: list[dict[str, Any]] = []     # every refresh, in order (costs + permutations)
        self.allocation: Optional[dict[str, Any]] = None   # the current allocation decision (serialised)
        self.allocation_history: list[dict[str, Any]] = []
        self.scan_order: Optional[list[list[int]]] = None   # cumulative: original channel at each position
        self.collector = None

    # -------------------------------------------------------------------------------- model structure
    def build_structure(self, model: AdaptiveMambaForCausalLM) -> AdaptiveMambaForCausalLM:
        """Apply masks and the current allocation to a freshly built model (weights are loaded afterwards)."""
        if self.mask_cfg is not None:
            frozen = not any(p.requires_grad for p in model.parameters())
            apply_masks(model, self.mask_cfg)
            if frozen:      # fine-tune: base weights stay frozen, mask logits train
                for name, p in model.named_parameters():
                    p.requires_grad_("mask_logits" in name)
        if self.peft_cfg is not None and self.allocation is None and self.cfg.peft.mode in ("lora", "ia3"):
            self.allocation = uniform_allocation(model, self.cfg.peft.mode, self.peft_cfg).to_dict()
            self.allocation_history.append({"step": 0, **self.allocation})
        if self.allocation is not None:
            apply_allocation(model, AllocationDecision.from_dict(self.allocation), self.peft_cfg)
        if self.scan_order is not None:      # the weights loaded next are in this order; record it with the model
            model.config.extra["scan_order"] = [list(o) for o in self.scan_order]
        return model

    def attach(self, model: AdaptiveMambaForCausalLM) -> None:
        """Hook the statistics collector onto the engine's model (after every engine (re)build)."""
        if not (self.cfg.scan_order.enabled and self.cfg.scan_order.every):
            return
        previous = self.collector
        self.collector = ScanStatsCollector(model, token_stride=self.cfg.scan_order.token_stride)
        if previous is not None:
            previous.disable()
            for new, old in zip(self.collector.state_tensors(), previous.state_tensors()):
                new.copy_(old)
        self.collector.enable()

    # ----------------------------------------------------------------------------------- per step
    def regularizer(self, model: AdaptiveMambaForCausalLM) -> Tensor:
        """masks.mask_regularizer (0 without masks): sparsity_weight * |sparsity - target| over the masks."""
        if self.mask_cfg is None or not model.training:
            return torch.zeros((), device=model.embedding.weight.device)
        return mask_regularizer(model, self.mask_cfg)

    def on_step_begin(self, model: AdaptiveMambaForCausalLM, step: int) -> None:
        if self.mask_cfg is not None:
            set_temperature(model, temperature_at(step, self.mask_cfg))

    # --------------------------------------------------------------------------------- refreshes
    def maybe_refresh(self, run: TrainingRun, step: int) -> dict[str, Any]:
        """Run the refreshes due after optimizer step `step`; returns metrics, tables and log lines."""
        events: dict[str, Any] = {"metrics": {}, "tables": [], "lines": [], "decisions": []}
        freq = self.cfg.scan_order.every
        if self.collector is not None and freq and step % freq == 0 and step < self.total_steps:
            self._refresh_scan(run, step, events)
            events["decisions"].append("scan_order")
        if self.peft_cfg is not None and self._allocation_due(step) and step < self.total_steps:
            self._reallocate(run, step, events)
        return events

    def _allocation_due(self, step: int) -> bool:
        if self.cfg.peft.mode != "hybrid":
            return False
        freq, first = self.cfg.peft.every, self.cfg.first_allocation_step
        if step == first:
            return True
        return step > first and freq > 0 and (step - first) % freq == 0

    def _refresh_scan(self, run: TrainingRun, step: int, events: dict[str, Any]) -> None:
        tensors = self.collector.state_tensors()
        for t, total in zip(tensors, all_reduce_sum(tensors)):
            t.copy_(total)
        model = run.model
        # the plan reads parameter shapes and mask logits: under ZeRO-3 (partitioned) plan on a gathered copy
        plan_model = run.full_model() if run.partitioned else model
        # each rank decides a share of the layers; after the exchange every rank holds the whole decision
        decision = decide_scan_order(self.collector, step=step, block_sizes=reorder_block_sizes(plan_model),
                                     rank=self.ctx.rank, world_size=self.ctx.world_size, exchange=all_gather_object)
        plan = [(op.name, op.apply) for op in reparametrization_plan(plan_model, decision)]
        run.permute_parameters(plan)
        order = current_scan_order(model)
        self.scan_order = [[o[k] for k in perm] for o, perm in zip(order, decision.perms)]
        model.config.extra["scan_order"] = [list(o) for o in self.scan_order]
        self.collector.reset()
        self.scan_decisions.append(decision.to_dict())
        ci, ca = sum(decision.cost_identity), sum(decision.cost_after)
        reduction = 100 * (1 - ca / ci) if ci else 0.0
        events["metrics"].update({"scan/path_cost_before": ci, "scan/path_cost_after": ca,
                                  "scan/cost_reduction_pct": reduction,
                                  **{f"scan/layer{i}_cost_after": c for i, c in enumerate(decision.cost_after)}})
        events["lines"].append(f"scan order refreshed at step {step}: path cost {ci:.2f} -> {ca:.2f} "
                               f"({reduction:.1f}% lower), {len(plan)} tensors permuted on every rank")

    def initial_allocation(self, model: AdaptiveMambaForCausalLM, batches: list[tuple[Tensor, Tensor]]
                           ) -> dict[str, Any]:
        """The step-0 allocation on the freshly built model, before the engine exists (when it is due at step 0);
        collective. Returns the events to log."""
        events: dict[str, Any] = {"metrics": {}, "tables": [], "lines": [], "decisions": []}
        if self.peft_cfg is not None and self._allocation_due(0):
            self._allocate(model, batches, 0, events)
        return events

    def _reallocate(self, run: TrainingRun, step: int, events: dict[str, Any]) -> None:
        model = run.full_model().to(run.device)                            # collective: gathers every rank
        self._allocate(model, run.upcoming_batches(), step, events)
        run.rebuild_engine(model)                     # under ZeRO-3 this partitions `model`'s parameters

    def _allocate(self, model: AdaptiveMambaForCausalLM, batches: list[tuple[Tensor, Tensor]], step: int,
                  events: dict[str, Any]) -> None:
        """Importance on every rank (averaged), decision on rank 0 (broadcast), applied to `model` on every rank."""
        device = model.embedding.weight.device
        batches = [(ids[:, :SALIENCY_MAX_TOKENS].to(device), labels[:, :SALIENCY_MAX_TOKENS].to(device))
                   for ids, labels in batches]
        world = self.ctx.world_size
        importance = module_importance(model, self.peft_cfg, batches, step,
                                       reduce_grads=lambda grads: [g / world for g in all_reduce_sum(grads)])
        names = list(importance)                                           # model order: the same on every rank
        values = all_reduce_sum([torch.tensor([importance[n] for n in names], dtype=torch.float64)])[0]
        importance = {n: float(v) / world for n, v in zip(names, values)}
        pruned = pruned_modules(model, self.peft_cfg.target_modules)      # same weights, so the same on every rank
        decision = decide_allocation(importance, self.peft_cfg, step, pruned) if self.ctx.is_main else None
        decision = broadcast_object(decision.to_dict() if decision is not None else None)
        allocation = AllocationDecision.from_dict(decision)
        apply_allocation(model, allocation, self.peft_cfg)
        self.allocation = decision
        self.allocation_history.append({"step": step, **decision})
        trainable, total = parameter_counts(model)
        table = format_allocation_table(allocation)
        events["decisions"].append("allocation")
        events["metrics"].update({"peft/trainable_params": trainable, "peft/trainable_pct": 100 * trainable / total})
        events["tables"].append(("peft/allocation", ["module", "importance", "kind"],
                                 [[n, importance.get(n, float("nan")), k]
                                  for n, k in allocation.kinds.items()]))
        events["lines"].append(f"PEFT allocation at step {step} ({trainable:,} trainable parameters, "
                               f"{100 * trainable / total:.2f}%"
                               + (f"; {len(pruned)} fully pruned module(s) left frozen" if pruned else "")
                               + f"):\n{table}")

    # ---------------------------------------------------------------------------------- reporting
    def inspect(self, run: TrainingRun) -> dict[str, Any]:
        """Per-layer sparsity and trainable share of the current model (for evals); collective."""
        if self.mask_cfg is None:
            return {"metrics": {}, "line": ""}
        model = run.full_model() if run.partitioned else run.model
        report = sparsity_report(model)
        metrics = {"masks/sparsity": report["sparsity"],
                   "masks/executed_flops_ratio": report["executed_flops"] / report["dense_flops"],
                   **{f"masks/{name}": r["sparsity"] for name, r in report["modules"].items()}}
        return {"metrics": metrics, "line": f"mask sparsity {report['sparsity']:.3f}", "report": report}

    def final_report(self, run: TrainingRun) -> dict[str, Any]:
        """Values and one sentence about the pillars for the run summary (collective)."""
        model = run.full_model()
        values: dict[str, Any] = {}
        parts = []
        trainable, total = parameter_counts(model)
        values["trainable_pct"] = round(100 * trainable / total, 2)
        values["trainable_params"], values["total_params"] = trainable, total
        if self.mask_cfg is not None:
            rep = sparsity_report(model)
            values["sparsity"] = round(rep["sparsity"], 4)
            values["executed_flops_ratio"] = round(rep["executed_flops"] / rep["dense_flops"], 4)
            values["module_sparsity"] = {name: r["sparsity"] for name, r in rep["modules"].items()}
            parts.append(f"mask sparsity {100 * rep['sparsity']:.1f}% "
                         f"(target {100 * self.cfg.masks.target_sparsity:.0f}%; "
                         f"evaluation executes {100 * values['executed_flops_ratio']:.1f}% of the dense FLOPs of the "
                         "masked modules)")
        values.update(self._flops(model))
        parts.append(f"whole-model FLOPs per token at seq_len {self.cfg.train.seq_len}: evaluation forward "
                     f"{values['flops_eval_forward']:,.0f} ({100 * values['flops_eval_forward'] / values['flops_dense_forward']:.1f}% "
                     f"of dense), training step {values['flops_train_step']:,.0f}, exported model forward "
                     f"{values['flops_export_forward']:,.0f}")
        parts.append(f"trainable parameters {values['trainable_pct']:.2f}% ({trainable:,} of {total:,})")
        if self.scan_decisions:
            first, last = self.scan_decisions[0], self.scan_decisions[-1]
            values["scan_refreshes"] = len(self.scan_decisions)
            values["scan_cost_reduction_pct"] = round(
                100 * (1 - sum(last["cost_after"]) / sum(last["cost_identity"])), 2)
            parts.append(f"{len(self.scan_decisions)} scan-order refreshes (last one lowered the path cost by "
                         f"{values['scan_cost_reduction_pct']:.1f}%; first by "
                         f"{100 * (1 - sum(first['cost_after']) / sum(first['cost_identity'])):.1f}%)")
        if self.allocation is not None:
            kinds = AllocationDecision.from_dict(self.allocation).kinds
            counts = {k: sum(1 for v in kinds.values() if v == k) for k in ("lora", "ia3", "frozen")}
            values["allocation"] = counts
            values["allocation_history"] = self.allocation_history
            parts.append(f"allocation after {len(self.allocation_history)} decision(s): "
                         f"LoRA (r={self.cfg.peft.lora_r}) on "
                         f"{counts['lora']}, IA3 on {counts['ia3']}, frozen {counts['frozen']} of {len(kinds)} modules")
        return {"values": values, "text": "Pillars: " + "; ".join(parts) + "."}

    def _flops(self, model: AdaptiveMambaForCausalLM) -> dict[str, float]:
        """Executed FLOPs per token (adaptive_mamba.flops) of `model` at evaluation and in a training step, of the
        dense model of the same shape and of the exported (merged) model, which counts what really runs there."""
        seq_len, was_training = self.cfg.train.seq_len, model.training
        count = model_flops(model.eval(), seq_len)
        dense = AdaptiveMambaForCausalLM(type(model.config).from_dict({**model.config.to_dict(), "extra": {}}))
        exported = merged_plain_model(copy.deepcopy(model)).eval()
        model.train(was_training)
        return {"flops_eval_forward": count.per_token()["forward"],
                "flops_train_step": count.per_token()["training_step"],
                "flops_dense_forward": model_flops(dense.eval(), seq_len).per_token()["forward"],
                "flops_export_forward": model_flops(exported, seq_len).per_token()["forward"]}

    def export(self, model: AdaptiveMambaForCausalLM, out: Path) -> list[Path]:
        """Adapters in peft format (when allocated) and a merged plain model (adapters merged, hard masks baked
        into the weights) that `AdaptiveMambaForCausalLM.from_pretrained` loads."""
        save_adaptive_model(model, out / "adaptive")      # base weights + masks + peft-format adapters
        merged_plain_model(model).save_pretrained(out / "merged")
        return [out / "adaptive", out / "merged"]

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Decisions (identical on every rank): saved in trainer.json."""
        return {"scan_decisions": self.scan_decisions, "scan_order": self.scan_order, "allocation": self.allocation,
                "allocation_history": self.allocation_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scan_decisions = list(state.get("scan_decisions", []))
        self.scan_order = state.get("scan_order")
        self.allocation = state.get("allocation")
        self.allocation_history = list(state.get("allocation_history", []))

    def rank_state_dict(self) -> dict[str, Any]:
        """Per-rank statistics not yet all-reduced (scan collector sums)."""
        return {"scan_stats": None if self.collector is None else [t.cpu().clone()
                                                                   for t in self.collector.state_tensors()]}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if self.collector is not None and state.get("scan_stats") is not None:
            for t, saved in zip(self.collector.state_tensors(), state["scan_stats"]):
                t.copy_(saved)


def merged_plain_model(model: AdaptiveMambaForCausalLM) -> AdaptiveMambaForCausalLM:
    """A plain AdaptiveMambaForCausalLM computing what `model` computes in evaluation mode: the LoRA / IA3
    adapters are merged into their base weights first (the adapted layer computes (W + delta) * M), then each hard
    mask is multiplied into its weight (dropped structured outputs keep their bias, as the compact forward does), and
    each channel mask becomes a mixer of its kept channels (config.layer_d_inner: the export executes the reduced
    FLOPs). `model` is consumed."""
    with torch.no_grad():
        for name, _, module, _ in iter_projections(model):
            if adapter_kind(module) != "frozen":
                detach_adapter(model, name, merge=True)
            parent, attr, layer = resolve_module(model, name)
            if isinstance(layer, MaskedLinear):
                layer.weight.mul_(layer.expand(layer.hard_mask().to(layer.weight.dtype)))
                plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
                plain.weight, plain.bias = layer.weight, layer.bias
                setattr(parent, attr, plain)
        compile_masks(model)        # what remains are channel masks: mixers of the kept channels (layer_d_inner)
    config = type(model.config).from_dict(model.config.to_dict())
    config.extra = {k: v for k, v in config.extra.items() if k not in ("masks", "hybrid_peft")}
    config.extra["merged"] = {"masks_baked": True, "adapters_merged": True}
    config.gradient_checkpointing = False
    plain_model = AdaptiveMambaForCausalLM(config)
    plain_model.load_state_dict(model.state_dict(), strict=True)
    return plain_model
