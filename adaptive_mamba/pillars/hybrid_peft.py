"""Pillar 3: hybrid PEFT. Module importance decides which projections get LoRA, which get IA3 and which stay
frozen; re-deciding later moves adapters between modules.

    HybridPeftConfig                        thresholds, LoRA r / alpha / dropout, targets, importance source
    module_importance(model, cfg, batches)  {module name: importance} in model order (plain floats; to all-reduce,
                                            torch.tensor(list(d.values())) is aligned across ranks)
    pruned_modules(model)                   modules whose hard mask keeps nothing (never adapted)
    decide_allocation(importance, cfg, step, pruned)  -> AllocationDecision (deterministic, JSON-safe)
    uniform_allocation(model, kind, cfg)    one kind on every target (the plain LoRA / IA3 controls)
    apply_allocation(model, decision, cfg)  merge/remove adapters of modules that change kind, inject peft LoRA /
                                            IA3 layers on the new ones, set requires_grad on every parameter
    format_allocation_table(decision)       'blocks.0.mixer.in_proj: 3.1e-05 -> LoRA' lines plus the counts
    trainable_report(model)                 peft's 'trainable params: N || all params: M || trainable%: P'
    current_allocation(model)               {module name: 'lora' | 'ia3' | 'frozen'} read from the model
    adapter_kind(module)                    'lora' | 'ia3' | 'frozen' of one module (without importing peft)

Importance of a module (sign-aware: it means "worth adapting"; never mean |L|, which ranks a fully pruned
module, L << 0, highest):
    "saliency" (default)  mean |W * dL/dW| over the module's weight (AdaLoRA / MambaPEFT sensitivity), from one
                          forward/backward of the evaluation-mode model (hard masks) on the given batches. Weights a
                          hard mask drops get exactly 0, so a fully pruned module scores 0. Needs no mask history and
                          no masks at all, so it can allocate before the first training step (no flat start where
                          only mask logits train) and is the importance of the masks-off control.
    "activations"         the mean mask activation sum_t M_t / T over the last T = importance_window training
                          forwards (recorded by MaskedLinear; the design's seed formula). Needs masks and history.
A module whose hard mask keeps nothing (`pruned_modules`) never gets an adapter, whatever its importance.

Allocation (n adaptable modules ranked by importance, descending; ties broken by module name, ascending):
    n_adapted = floor(application_ratio * n + 1/2)                           (round half up, exact decimals)
    n_lora    = min(n_adapted, floor(importance_threshold * application_ratio * n + 1/2))
    the first n_lora modules get LoRA, the next n_adapted - n_lora get IA3, the rest are frozen. Pruned modules
    are skipped (frozen); the counts come from all n modules, capped at the number of live ones.
The seed's example (4 layers x 4 projections = 16 modules, threshold 0.5, ratio 0.3): n_adapted = floor(5.3) = 5,
n_lora = floor(2.9) = 2, so 2 LoRA, 3 IA3, 11 frozen.

Exact merges. On a masked projection, LoRA runs as the peft variant MaskedLoraVariant (masked_lora.py): its update is masked like
the base weight, with the same mask sample (structured masks: the LoRA path's output rows or input columns;
unstructured: the delta weight B A elementwise), so the layer computes (W + s B A) * M. Merging writes W + s B A
into the weight, which the mask then multiplies: the merged layer computes the same function, in training (same
sample) and evaluation (hard mask). IA3 scales whole rows / columns, which commute with any mask. So a merge on a
kind change (LoRA -> frozen, IA3 -> frozen, LoRA <-> IA3) leaves outputs unchanged up to float rounding.
Base weights stay bit-identical while a module is frozen, carries an adapter, or loses it with
on_kind_change="remove"; they change only when an adapter is merged into them (on_kind_change="merge", the
default): W becomes W + s B A (LoRA) or W * l (IA3), including entries the mask currently drops.

After apply_allocation, trainable parameters are exactly the adapters (plus the mask logits when train_masks):
rebuild the optimizer from [p for p in model.parameters() if p.requires_grad]. New adapters are initialised
from a generator seeded by (cfg.seed, decision.step, module name): the same decision gives the same weights on
every rank and every time, without touching the global RNG.

peft (which imports transformers, several seconds) is imported by the functions that use it, so that reading a
training config (`--help`, a bad key) does not load it.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import warnings
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from adaptive_mamba.config import Settings, above, at_least, between, check_known_keys, setting
from adaptive_mamba.model import parameter_counts
from adaptive_mamba.pillars.common import (PROJECTIONS, base_layer, check_projections, iter_projections,
                                           resolve_module)
from adaptive_mamba.pillars.masks import MaskedLinear

if TYPE_CHECKING:
    from peft import IA3Config, LoraConfig

    from adaptive_mamba.model import AdaptiveMambaForCausalLM

KINDS = ("lora", "ia3", "frozen")
IMPORTANCE_SOURCES = ("saliency", "activations", "random")
PEFT_MODES = ("hybrid", "lora", "ia3", "full")
KIND_LABELS = {"lora": "LoRA", "ia3": "IA3", "frozen": "frozen"}
ADAPTER_NAMES = {"lora": "lora", "ia3": "ia3"}     # peft adapter name per kind


@dataclass
class HybridPeftConfig(Settings):
    """Pillar 3 settings (the `peft` section of a training config). In training, target_modules follows
    masks.targets and seed follows train.seed."""

    enabled: bool = setting(True, "attach adapters (pillar 3)")
    mode: str = setting("hybrid", "hybrid (allocation by importance) | lora / ia3 (that adapter on every target "
                        "projection) | full (no adapters, every weight trains)", choices=PEFT_MODES)
    importance_source: str = setting("saliency", "hybrid: saliency (mean |W * grad|, masks optional) | activations "
                                     "(mean mask activation over the last importance_window steps; needs masks) | "
                                     "random (a control: seeded uniform importance at the same budget)",
                                     choices=IMPORTANCE_SOURCES)
    importance_threshold: float = setting(0.5, "fraction of the adapted modules that get LoRA (the most important)",
                                          check=between(0, 1))
    application_ratio: float = setting(0.3, "fraction of all adaptable modules that get an adapter",
                                       check=between(0, 1))
    lora_r: int = setting(8, "LoRA rank", check=at_least(1))
    lora_alpha: float = setting(16.0, "LoRA alpha", check=above(0))
    lora_dropout: float = setting(0.0, "LoRA dropout", check=between(0, 1, True))
    every: int = setting(100, "optimizer steps between hybrid reallocations (0: only once at start_step)",
                         check=at_least(0))
    start_step: Optional[int] = setting(None, "step of the first allocation (0: before the first step); None: 0 "
                                        "when fine-tuning (frozen base), else `every`", check=at_least(0))
    target_modules: tuple[str, ...] = setting(PROJECTIONS, "projections that can get an adapter")
    importance_window: int = setting(100, "T, for activations (at most masks.activation_window)",
                                     check=at_least(1))
    train_masks: bool = setting(True, "keep training the mask logits next to the adapters")
    on_kind_change: str = setting("merge", "adapters of modules that change kind: merge into W | remove",
                                  choices=("merge", "remove"))
    ia3_scale_inputs: tuple[str, ...] = setting(("x_proj", "out_proj"), "IA3 scales these projections' inputs "
                                                "(else outputs)")
    seed: int = setting(0, "seed of the random importance control")

    def __post_init__(self) -> None:
        self.target_modules = check_projections(self.target_modules, "HybridPeftConfig.target_modules")
        self.ia3_scale_inputs = tuple(self.ia3_scale_inputs)
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules),
                "ia3_scale_inputs": list(self.ia3_scale_inputs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HybridPeftConfig":
        renamed = {"peft_application_ratio": "application_ratio"}          # the name in models saved before
        data = {renamed.get(k, k): v for k, v in data.items()}
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


def module_importance(model: "AdaptiveMambaForCausalLM", cfg: HybridPeftConfig,
                      batches: Iterable[tuple[Tensor, Tensor]] = (), step: int = 0,
                      reduce_grads: Optional[Callable[[list[Tensor]], list[Tensor]]] = None) -> dict[str, float]:
    """Importance of every adaptable module, in model order (see the module docstring). "saliency" needs
    `batches` of (input_ids, labels) (and `reduce_grads`, e.g. a mean over ranks, makes it the saliency of the
    global batch); "random" (the study's control at the same budget) depends only on (seed, step, module name),
    so every rank draws the same values."""
    if cfg.importance_source == "saliency":
        return gradient_saliency(model, batches, cfg.target_modules, reduce_grads)
    if cfg.importance_source == "random":
        return {name: float(torch.rand((), generator=_seeded_generator(cfg, step, name)))
                for name, _, _, _ in iter_projections(model, cfg.target_modules)}
    return mask_activation(model, cfg)


def gradient_saliency(model: "AdaptiveMambaForCausalLM", batches: Iterable[tuple[Tensor, Tensor]],
                      targets: tuple[str, ...],
                      reduce_grads: Optional[Callable[[list[Tensor]], list[Tensor]]] = None) -> dict[str, float]:
    """mean |W * dL/dW| of each target projection's base weight, the loss averaged over `batches` (and the gradients
    through `reduce_grads`, e.g. averaged over ranks, so that 2 ranks score what 1 process with both batches does),
    computed on the evaluation-mode model (hard masks: dropped weights get no gradient). Leaves requires_grad and the
    training mode as they were and clears every .grad."""
    batches = list(batches)
    if not batches:
        raise ValueError("importance_source='saliency' needs at least one batch of (input_ids, labels)")
    weights = {name: base_layer(module).weight for name, _, module, _ in iter_projections(model, targets)}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for input_ids, labels in batches:
                (model(input_ids, labels=labels, return_logits=False).loss / len(batches)).backward()
        grads = [torch.zeros_like(w, dtype=torch.float32) if w.grad is None else w.grad.float()
                 for w in weights.values()]
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        return {name: float((w.detach().float() * g).abs().mean()) for (name, w), g in zip(weights.items(), grads)}
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.zero_grad(set_to_none=True)
        model.train(was_training)


@torch.no_grad()
def mask_activation(model: "AdaptiveMambaForCausalLM", cfg: HybridPeftConfig) -> dict[str, float]:
    """sum_t M_t / T: the mean mask activation over each module's last `importance_window` training forwards."""
    out = {}
    for name, _, module, _ in iter_projections(model, cfg.target_modules):
        mask = _mask_of(model, name, module)
        capacity, count = mask.mask_history.numel(), int(mask.history_count)
        if cfg.importance_window > capacity:
            raise ValueError(f"importance_window {cfg.importance_window} exceeds the {capacity} steps the masks "
                             "record: raise MaskConfig.activation_window")
        if count == 0:
            raise ValueError(f"{name}: no training forward has been recorded yet, so 'activations' importance is "
                             "undefined; train some steps first or use importance_source='saliency'")
        n = min(count, cfg.importance_window)
        idx = (count - 1 - torch.arange(n, device=mask.mask_history.device)) % capacity
        out[name] = float(mask.mask_history[idx].mean())
    return out


def pruned_modules(model: "AdaptiveMambaForCausalLM", targets: tuple[str, ...] = PROJECTIONS) -> list[str]:
    """Target projections whose hard mask keeps no weight (they never get an adapter)."""
    return [name for name, _, module, _ in iter_projections(model, targets)
            if isinstance(base_layer(module), MaskedLinear) and not bool(base_layer(module).hard_mask().any())]


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def allocation_counts(n: int, cfg: HybridPeftConfig) -> tuple[int, int]:
    """(n_lora, n_ia3) for n adaptable modules, by the rounding rule in the module docstring."""
    ratio, threshold = Fraction(str(cfg.application_ratio)), Fraction(str(cfg.importance_threshold))
    n_adapted = _round_half_up(ratio * n)
    n_lora = min(n_adapted, _round_half_up(threshold * ratio * n))
    return n_lora, n_adapted - n_lora


def decide_allocation(importance: Mapping[str, float], cfg: HybridPeftConfig, step: int = 0,
                      pruned: Iterable[str] = ()) -> AllocationDecision:
    """Rank by importance (descending, ties by name) and assign LoRA / IA3 / frozen; `pruned` modules stay frozen.
    Deterministic."""
    if not importance:
        raise ValueError("no module importance given: nothing to allocate")
    bad = [n for n, v in importance.items() if not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"non-finite importance for {bad}: the mask logits diverged")
    pruned = set(pruned)
    ranked = [n for n in sorted(importance, key=lambda n: (-float(importance[n]), n)) if n not in pruned]
    n_lora, n_ia3 = allocation_counts(len(importance), cfg)
    n_lora = min(n_lora, len(ranked))
    n_ia3 = min(n_ia3, len(ranked) - n_lora)
    kind_of = {n: "frozen" for n in pruned} | {n: ("lora" if r < n_lora else "ia3" if r < n_lora + n_ia3 else "frozen") for r, n in enumerate(ranked)}
    return AllocationDecision({n: kind_of[n] for n in importance}, {n: float(v) for n, v in importance.items()}, step)


def uniform_allocation(model: "AdaptiveMambaForCausalLM", kind: str, cfg: HybridPeftConfig) -> AllocationDecision:
    """The same kind on every target projection (the plain-LoRA / plain-IA3 controls); importance is not used
    (NaN)."""
    names = [name for name, _, _, _ in iter_projections(model, cfg.target_modules)]
    return AllocationDecision({n: kind for n in names}, {n: float("nan") for n in names})


def format_allocation_table(decision: AllocationDecision) -> str:
    """One line per module, 'blocks.0.mixer.in_proj: 3.1e-05 -> LoRA' (4 significant digits), then the counts."""
    lines = [f"{n}: {decision.importance[n]:.4g} -> {KIND_LABELS[k]}" for n, k in decision.kinds.items()]
    c = decision.counts()
    lines.append(f"allocation at step {decision.step}: {c['lora']} LoRA, {c['ia3']} IA3, {c['frozen']} frozen "
                 f"(of {len(decision.kinds)} modules)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ apply
def current_allocation(model: "AdaptiveMambaForCausalLM",
                       targets: tuple[str, ...] = PROJECTIONS) -> dict[str, str]:
    """The kind each projection has right now, read from the modules themselves."""
    return {name: adapter_kind(module) for name, _, module, _ in iter_projections(model, targets)}


def adapter_kind(module: nn.Module) -> str:
    """'lora' or 'ia3' for a peft LoRA / IA3 layer, else 'frozen'. Until something imported peft no module can be
    one, and the check does not import it (peft loads transformers: seconds for every run without adapters)."""
    if "peft" not in sys.modules:
        return "frozen"
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    return "lora" if isinstance(module, LoraLayer) else "ia3" if isinstance(module, IA3Layer) else "frozen"


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


def _peft_config(kind: str, names: list[str], cfg: HybridPeftConfig) -> LoraConfig | IA3Config:
    """peft's config of the `kind` adapter ("lora" or "ia3") on the modules `names`."""
    from peft import IA3Config, LoraConfig

    if kind == "lora":
        return LoraConfig(target_modules=names, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, bias="none")
    return IA3Config(target_modules=names,
                     feedforward_modules=[n for n in names if n.rsplit(".", 1)[1] in cfg.ia3_scale_inputs])


def _inject(model: nn.Module, kind: str, names: list[str], cfg: HybridPeftConfig) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():   # peft warns when a model already has a peft_config: we keep it consistent
        warnings.simplefilter("ignore")
        inject_adapter_in_model(_peft_config(kind, names, cfg), model, adapter_name=ADAPTER_NAMES[kind])


@torch.no_grad()
def detach_adapter(model: nn.Module, name: str, merge: bool) -> None:
    """Replace module `name`'s peft wrapper by its base layer, merging the adapter into the weight first if asked."""
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
            configs[ADAPTER_NAMES[kind]] = _peft_config(kind, names, cfg)
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
    from adaptive_mamba.pillars.masked_lora import MaskedLoraVariant

    changes: dict[str, list[str]] = {"merged": [], "removed": [], "lora": [], "ia3": []}
    for name, kind in decision.kinds.items():
        if current[name] != kind and current[name] != "frozen":
            detach_adapter(model, name, merge=cfg.on_kind_change == "merge")
            changes["merged" if cfg.on_kind_change == "merge" else "removed"].append(name)
    for kind in ("lora", "ia3"):
        new = [n for n, k in decision.kinds.items() if k == kind and current[n] != kind]
        if new:
            _inject(model, kind, new, cfg)
            if kind == "lora":
                for name in new:
                    _init_lora(model, name, cfg, decision.step)
                    layer = model.get_submodule(name)
                    if isinstance(base_layer(layer), MaskedLinear):
                        layer.lora_variant[ADAPTER_NAMES["lora"]] = MaskedLoraVariant()
            changes[kind] = new
    _sync_peft_config(model, cfg)
    set_trainable(model, cfg)
    model.config.extra["hybrid_peft"] = {"decision": decision.to_dict(), "config": cfg.to_dict()}
    return changes


def trainable_report(model: nn.Module) -> str:
    """'trainable params: N || all params: M || trainable%: P' as peft prints it (counts: model.parameter_counts)."""
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


__all__ = ["AllocationDecision", "HybridPeftConfig", "IMPORTANCE_SOURCES", "adapter_kind", "allocation_counts",
           "apply_allocation", "current_allocation", "decide_allocation", "detach_adapter", "format_allocation_table",
           "gradient_saliency", "is_adapter_param", "mask_activation", "module_importance", "pruned_modules",
           "set_trainable", "trainable_report", "uniform_allocation"]
