"""Pillar 3: hybrid PEFT. The masks' importance decides which projections get LoRA, which get IA3 and which stay
frozen; re-deciding later moves adapters between modules.

    HybridPeftConfig                        thresholds, LoRA r / alpha / dropout, targets, importance source
    module_importance(model, cfg)           {module name: importance} in model order (plain floats; to all-reduce,
                                            torch.tensor(list(d.values())) is aligned across ranks)
    decide_allocation(importance, cfg)      -> AllocationDecision (deterministic, JSON-safe to_dict/from_dict)
    apply_allocation(model, decision, cfg)  merge/remove adapters of modules that change kind, inject peft LoRA /
                                            IA3 layers on the new ones, set requires_grad on every parameter
    format_allocation_table(decision)       'blocks.0.mixer.in_proj: 0.8543 -> LoRA' lines plus the counts
    trainable_report(model)                 peft's 'trainable params: N || all params: M || trainable%: P'
    current_allocation(model)               {module name: 'lora' | 'ia3' | 'frozen'} read from the model

Importance of a module: "logits" = mean |L| of its mask logits; "activations" = the mean mask activation over its
last `importance_window` training forwards (recorded by MaskedLinear). Both need apply_masks first.

Allocation (n adaptable modules ranked by importance, descending; ties broken by module name, ascending):
    n_adapted = floor(peft_application_ratio * n + 1/2)                           (round half up, exact decimals)
    n_lora    = min(n_adapted, floor(importance_threshold * peft_application_ratio * n + 1/2))
    the first n_lora modules get LoRA, the next n_adapted - n_lora get IA3, the rest are frozen.
The seed's example (4 layers x 4 projections = 16 modules, threshold 0.5, ratio 0.3): n_adapted = floor(5.3) = 5,
n_lora = floor(2.9) = 2, so 2 LoRA, 3 IA3, 11 frozen.

After apply_allocation, trainable parameters are exactly the adapters (plus the mask logits when train_masks):
rebuild the optimizer from [p for p in model.parameters() if p.requires_grad]. New adapters are initialised
from a generator seeded by (cfg.seed, decision.step, module name): the same decision gives the same weights on
every rank and every time, without touching the global RNG.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Mapping

import torch
from peft import IA3Config, LoraConfig, inject_adapter_in_model
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from torch import nn

from adaptive_mamba.config import check_known_keys
from adaptive_mamba.pillars.common import base_layer, check_projections, iter_projections, resolve_module
from adaptive_mamba.pillars.masks import MaskedLinear

if TYPE_CHECKING:
    from adaptive_mamba.model import AdaptiveMambaForCausalLM

KINDS = ("lora", "ia3", "frozen")
KIND_LABELS = {"lora": "LoRA", "ia3": "IA3", "frozen": "frozen"}
ADAPTER_NAMES = {"lora": "lora", "ia3": "ia3"}     # peft adapter name per kind


@dataclass
class HybridPeftConfig:
    importance_threshold: float = 0.5        # fraction of the adapted modules that get LoRA (the most important)
    peft_application_ratio: float = 0.3      # fraction of all adaptable modules that get an adapter
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("in_proj", "x_proj", "dt_proj", "out_proj")
    importance_source: str = "logits"        # "logits" (mean |L|) or "activations" (mean mask over the window)
    importance_window: int = 100             # T, for "activations" (at most MaskConfig.activation_window)
    train_masks: bool = True                 # keep training the mask logits next to the adapters
    on_kind_change: str = "merge"            # adapters of modules that change kind: "merge" into W or "remove"
    ia3_scale_inputs: tuple[str, ...] = ("x_proj", "out_proj")   # IA3 scales these projections' inputs (else outputs)
    seed: int = 0

    def __post_init__(self) -> None:
        self.target_modules = check_projections(self.target_modules, "HybridPeftConfig.target_modules")
        self.ia3_scale_inputs = tuple(self.ia3_scale_inputs)
        for name in ("importance_threshold", "peft_application_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"HybridPeftConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.importance_source not in ("logits", "activations"):
            raise ValueError(f"importance_source must be 'logits' or 'activations', got {self.importance_source!r}")
        if self.on_kind_change not in ("merge", "remove"):
            raise ValueError(f"on_kind_change must be 'merge' or 'remove', got {self.on_kind_change!r}")
        if self.lora_r < 1 or self.importance_window < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_r and importance_window must be >= 1 and lora_dropout in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules),
                "ia3_scale_inputs": list(self.ia3_scale_inputs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HybridPeftConfig":
        check_known_keys(cls.__name__, data, {f.name for f in dataclasses.fields(cls)})
        return cls(**data)


@dataclass
class AllocationDecision:
    """Kind per module (model order), the importance it was decided from, and the step it was decided at."""

    kinds: dict[str, str]
    importance: dict[str, float]
    step: int = 0

    def __post_init__(self) -> None:
        bad = {n: k for n, k in self.kinds.items() if k not in KINDS}
        if bad:
            raise ValueError(f"unknown adapter kinds {bad}; allowed: {KINDS}")

    def modules(self, kind: str) -> list[str]:
        return [n for n, k in self.kinds.items() if k == kind]

    def counts(self) -> dict[str, int]:
        return {kind: len(self.modules(kind)) for kind in KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {"kinds": dict(self.kinds), "importance": dict(self.importance), "step": self.step}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AllocationDecision":
        return cls(kinds=dict(data["kinds"]), importance={k: float(v) for k, v in data["importance"].items()},
                   step=int(data.get("step", 0)))


# ------------------------------------------------------------------------------------------- importance
def _mask_of(model: "AdaptiveMambaForCausalLM", name: str, module: nn.Module) -> MaskedLinear:
    layer = base_layer(module)
    if not isinstance(layer, MaskedLinear):
        raise ValueError(f"{name} has no mask, so it has no importance: apply_masks with MaskConfig.targets "
                         "covering HybridPeftConfig.target_modules first")
    return layer


@torch.no_grad()
def module_importance(model: "AdaptiveMambaForCausalLM", cfg: HybridPeftConfig) -> dict[str, float]:
    """Importance of every adaptable module, in model order (see the module docstring)."""
    out = {}
    for name, _, module, _ in iter_projections(model, cfg.target_modules):
        mask = _mask_of(model, name, module)
        if cfg.importance_source == "logits":
            out[name] = float(mask.mask_logits.float().abs().mean())
            continue
        capacity, count = mask.mask_history.numel(), int(mask.history_count)
        if cfg.importance_window > capacity:
            raise ValueError(f"importance_window {cfg.importance_window} exceeds the {capacity} steps the masks "
                             "record: raise MaskConfig.activation_window")
        if count == 0:
            raise ValueError(f"{name}: no training forward has been recorded yet, so 'activations' importance is "
                             "undefined; train some steps first or use importance_source='logits'")
        n = min(count, cfg.importance_window)
        idx = (count - 1 - torch.arange(n, device=mask.mask_history.device)) % capacity
        out[name] = float(mask.mask_history[idx].mean())
    return out


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def allocation_counts(n: int, cfg: HybridPeftConfig) -> tuple[int, int]:
    """(n_lora, n_ia3) for n adaptable modules, by the rounding rule in the module docstring."""
    ratio, threshold = Fraction(str(cfg.peft_application_ratio)), Fraction(str(cfg.importance_threshold))
    n_adapted = _round_half_up(ratio * n)
    n_lora = min(n_adapted, _round_half_up(threshold * ratio * n))
    return n_lora, n_adapted - n_lora


def decide_allocation(importance: Mapping[str, float], cfg: HybridPeftConfig, step: int = 0) -> AllocationDecision:
    """Rank by importance (descending, ties by name) and assign LoRA / IA3 / frozen. Deterministic."""
    if not importance:
        raise ValueError("no module importance given: nothing to allocate")
    bad = [n for n, v in importance.items() if not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"non-finite importance for {bad}: the mask logits diverged")
    ranked = sorted(importance, key=lambda n: (-float(importance[n]), n))
    n_lora, n_ia3 = allocation_counts(len(ranked), cfg)
    kind_of = {n: ("lora" if r < n_lora else "ia3" if r < n_lora + n_ia3 else "frozen") for r, n in enumerate(ranked)}
    return AllocationDecision({n: kind_of[n] for n in importance}, {n: float(v) for n, v in importance.items()}, step)


def format_allocation_table(decision: AllocationDecision) -> str:
    """One line per module, 'blocks.0.mixer.in_proj: 0.8543 -> LoRA', then the counts."""
    lines = [f"{n}: {decision.importance[n]:.4f} -> {KIND_LABELS[k]}" for n, k in decision.kinds.items()]
    c = decision.counts()
    lines.append(f"allocation at step {decision.step}: {c['lora']} LoRA, {c['ia3']} IA3, {c['frozen']} frozen "
                 f"(of {len(decision.kinds)} modules)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ apply
def current_allocation(model: "AdaptiveMambaForCausalLM",
                       targets: tuple[str, ...] = ("in_proj", "x_proj", "dt_proj", "out_proj")) -> dict[str, str]:
    """The kind each projection has right now, read from the modules themselves."""
    return {name: "lora" if isinstance(module, LoraLayer) else "ia3" if isinstance(module, IA3Layer) else "frozen"
            for name, _, module, _ in iter_projections(model, targets)}


def _seeded_generator(cfg: HybridPeftConfig, step: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((cfg.seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())) % (2 ** 63))
    return g


@torch.no_grad()
def _init_lora(model: nn.Module, name: str, cfg: HybridPeftConfig, step: int) -> None:
    """peft's default LoRA init (A kaiming-uniform, B zero), drawn from a generator seeded per module."""
    layer = model.get_submodule(name)
    A = layer.lora_A[ADAPTER_NAMES["lora"]].weight
    g = _seeded_generator(cfg, step, name)
    A.copy_(nn.init.kaiming_uniform_(torch.empty(A.shape), a=math.sqrt(5), generator=g))
    layer.lora_B[ADAPTER_NAMES["lora"]].weight.zero_()


def _inject(model: nn.Module, kind: str, names: list[str], cfg: HybridPeftConfig) -> None:
    if kind == "lora":
        pcfg: Any = LoraConfig(target_modules=names, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout, bias="none")
    else:
        pcfg = IA3Config(target_modules=names,
                         feedforward_modules=[n for n in names if n.rsplit(".", 1)[1] in cfg.ia3_scale_inputs])
    with warnings.catch_warnings():   # peft warns when a model already has a peft_config: we keep it consistent
        warnings.simplefilter("ignore")
        inject_adapter_in_model(pcfg, model, adapter_name=ADAPTER_NAMES[kind])


@torch.no_grad()
def _detach_adapter(model: nn.Module, name: str, merge: bool) -> None:
    parent, attr, layer = resolve_module(model, name)
    if merge:
        layer.merge(adapter_names=list(layer.active_adapters))
    setattr(parent, attr, layer.get_base_layer())


def _sync_peft_config(model: nn.Module, cfg: HybridPeftConfig) -> None:
    """model.peft_config lists exactly the modules that carry each adapter (what peft's save functions read)."""
    alloc = current_allocation(model)
    configs = {}
    for kind in ("lora", "ia3"):
        names = sorted(n for n, k in alloc.items() if k == kind)
        if names:
            configs[ADAPTER_NAMES[kind]] = (
                LoraConfig(target_modules=names, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, bias="none") if kind == "lora" else
                IA3Config(target_modules=names,
                          feedforward_modules=[n for n in names if n.rsplit(".", 1)[1] in cfg.ia3_scale_inputs]))
    if configs:
        model.peft_config = configs
    elif hasattr(model, "peft_config"):
        del model.peft_config


def is_adapter_param(name: str) -> bool:
    return any(part.startswith(("lora_", "ia3_l")) for part in name.split("."))


def set_trainable(model: nn.Module, cfg: HybridPeftConfig) -> None:
    """Adapters trainable, mask logits trainable iff cfg.train_masks, everything else frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name) or (cfg.train_masks and name.endswith("mask_logits")))


def apply_allocation(model: "AdaptiveMambaForCausalLM", decision: AllocationDecision,
                     cfg: HybridPeftConfig) -> dict[str, list[str]]:
    """Make the model's adapters match `decision`. Modules keeping their kind keep their adapter (and its training
    state); modules changing kind first lose their adapter (merged into the base weight, or removed, per
    cfg.on_kind_change), then new LoRA / IA3 layers are injected with peft. The decision and cfg are recorded in
    model.config.extra["hybrid_peft"] (saved by save_adaptive_model). Returns what changed."""
    current = current_allocation(model, cfg.target_modules)
    unknown = sorted(set(decision.kinds) - set(current))
    if unknown:
        raise ValueError(f"the decision names modules that are not adaptable projections of this model: {unknown}")
    missing = sorted(set(current) - set(decision.kinds))
    if missing:
        raise ValueError(f"the decision does not cover the adaptable modules {missing}; decide from "
                         "module_importance(model, cfg) with the same target_modules")
    changes: dict[str, list[str]] = {"merged": [], "removed": [], "lora": [], "ia3": []}
    for name, kind in decision.kinds.items():
        if current[name] != kind and current[name] != "frozen":
            _detach_adapter(model, name, merge=cfg.on_kind_change == "merge")
            changes["merged" if cfg.on_kind_change == "merge" else "removed"].append(name)
    for kind in ("lora", "ia3"):
        new = [n for n, k in decision.kinds.items() if k == kind and current[n] != kind]
        if new:
            _inject(model, kind, new, cfg)
            if kind == "lora":
                for name in new:
                    _init_lora(model, name, cfg, decision.step)
            changes[kind] = new
    _sync_peft_config(model, cfg)
    set_trainable(model, cfg)
    model.config.extra["hybrid_peft"] = {"decision": decision.to_dict(), "config": cfg.to_dict()}
    return changes


def trainable_report(model: nn.Module) -> str:
    """'trainable params: N || all params: M || trainable%: P' as peft prints it: shared weights count once, and
    ZeRO-3 partitioned parameters count with their full size (ds_numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if p.numel() == 0 and hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


__all__ = ["AllocationDecision", "HybridPeftConfig", "allocation_counts", "apply_allocation", "current_allocation",
           "decide_allocation", "format_allocation_table", "is_adapter_param", "module_importance", "set_trainable",
           "trainable_report"]
