"""Pillar 2: learned masks over the mixer projections.

    MaskConfig                          what to mask (projections, layers), how (unstructured / structured blocks),
                                        the temperature schedule and the sparsity objective
    apply_masks(model, cfg)             replace each target nn.Linear by a MaskedLinear holding the same weight
                                        Parameters plus mask logits L; records cfg in model.config.extra["masks"]
    mask_regularizer(model, cfg)        sparsity_weight * |sparsity - target_sparsity|: add it to the loss
    temperature_at(step, cfg)           the annealed temperature tau at a step; set_temperature(model, tau) sets it
    sparsity_report(model, tokens)      per module and in total: realised (hard-mask) sparsity, dense FLOPs and the
                                        FLOPs of what evaluation actually executes
    compile_masks(model)                replace every MaskedLinear by a CompactLinear (hard mask baked in, kept
                                        channels of structured masks gathered into smaller dense weights)
    masked_modules(model)               {canonical name: MaskedLinear}, looking through peft wrappers

Training (module.training): M = sigmoid((L + G) / tau), G = log U - log(1 - U) logistic noise, weight W * M.
Evaluation: the hard mask L > 0. Structured masks then run a smaller dense matmul over the kept channels only,
so FLOPs and time fall; an unstructured hard mask is a dense matmul with zeros and costs dense FLOPs (so does a
structured mask on the outputs of a layer with fewer than GATHER_MIN_FAN_IN inputs, e.g. dt_proj).

The sparsity in the regulariser is the realised fraction of masked weights over all masked modules (hard masks
L <= 0, weighted by weight count), with the gradient of the expected sparsity 1 - mean(sigmoid(L)) passed
straight through. sigmoid(L) = P(L + G > 0) is the probability that the relaxed sample is "on" at every
temperature, so this gradient does not vanish as tau is annealed (sigmoid(L / tau) saturates and would freeze
the sparsity wherever it stood), and the value makes the realised sparsity, not a surrogate, reach the target.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_mamba.config import Settings, above, at_least, between, check_known_keys, setting
from adaptive_mamba.pillars.common import (D_INNER_SIDE, DEFAULT_TARGETS, PROJECTIONS, base_layer,
                                           check_projections, iter_projections, resolve_module)

if TYPE_CHECKING:
    from adaptive_mamba.model import AdaptiveMambaForCausalLM

SCHEDULES = ("constant", "linear", "exponential", "cosine")
MASK_KINDS = ("structured", "unstructured", "channel")
# A structured mask on the output side gathers kept rows only when the layer has at least this many inputs: below
# it (dt_proj: dt_rank inputs) the matmul is bound by writing its output, and a smaller matmul plus the scatter of
# its rows is slower than the dense masked matmul (bench/bench_masks.py measures both).
GATHER_MIN_FAN_IN = 64


@dataclass
class MaskConfig(Settings):
    """Pillar 2 settings. `structured_side` "auto" masks the d_inner side of each projection (see common.py),
    the side pillar 1 reorders, so that correlated channels are removed together."""

    enabled: bool = setting(True, "learn a mask over the projection weights (pillar 2)")
    kind: str = setting("structured", "structured (channel blocks) | unstructured (per weight) | channel (per "
                        "d_inner channel across the whole mixer; ignores targets, block_size, structured_side)",
                        choices=MASK_KINDS)
    block_size: int = setting(8, "channels per block (structured)", check=at_least(1))
    structured_side: str = setting("auto", "auto (the d_inner side, which pillar 1 reorders) | out (blocks of "
                                   "output channels) | in (input channels)", choices=("auto", "out", "in"))
    targets: tuple[str, ...] = setting(DEFAULT_TARGETS, "projections masked (and adaptable by pillar 3); on the "
                                       "command line comma-separated")
    layers: Optional[list[int]] = setting(None, "layers masked (None: every layer)")
    init_logit: float = setting(3.0, "logits start near keep (sigmoid(3) = 0.95) ...")
    init_std: float = setting(0.5, "... with a small spread so that they separate smoothly")
    tau_start: float = setting(1.0, "initial temperature", check=above(0))
    tau_end: float = setting(0.1, "temperature after anneal_steps", check=above(0))
    anneal_steps: Optional[int] = setting(None, "steps from tau_start to tau_end (None: the run's optimizer steps)",
                                          check=at_least(1))
    schedule: str = setting("exponential", "temperature schedule", choices=SCHEDULES)
    target_sparsity: float = setting(0.5, "fraction of weights the regularizer pushes to zero",
                                     check=between(0, 1, True))
    sparsity_weight: float = setting(5.0, "weight of the sparsity regularizer |sparsity - target| "
                                     "(BENCHMARKS.md: realised vs target)", check=at_least(0))
    learning_rate: Optional[float] = setting(5e-2, "peak lr of the mask logits (None: optim.lr), same schedule; "
                                             "Adam moves a logit ~lr per step: from +3 to 0 in ~60 steps",
                                             check=above(0))
    activation_window: int = setting(100, "steps of mean mask activation kept per module (pillar 3 importance)",
                                     check=at_least(1))
    hard_threshold: float = setting(0.01, "channel masks in training: a channel whose keep probability sigmoid(L) is "
                                    "below it is exactly 0 (not computed: training speeds up), above 1 - it exactly "
                                    "1 (0: only what the relaxed sample makes exact)", check=between(0, 0.5, True))

    def __post_init__(self) -> None:
        self.targets = check_projections(self.targets, "MaskConfig.targets")
        super().__post_init__()

    def side_for(self, proj: str) -> str:
        return D_INNER_SIDE[proj] if self.structured_side == "auto" else self.structured_side

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaskConfig":
        check_known_keys(cls.__name__, data, {f.name for f in dataclasses.fields(cls)})
        return cls(**data)


def logistic_noise(shape: torch.Size, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """G = log U - log(1 - U): the difference of two Gumbel(0, 1) variables, drawn from `generator` (default: the
    global one, which the trainer seeds per (seed, step, rank, micro-step))."""
    u = torch.rand(shape, device=like.device, dtype=torch.float32, generator=generator).clamp_(1e-6, 1 - 1e-6)
    return (torch.log(u) - torch.log1p(-u)).to(like.dtype)


class MaskLogits:
    """What every mask holds and does with its logits L (`mask_logits`) and its temperature `tau`."""

    mask_logits: Tensor
    mask_history: Tensor
    history_count: Tensor
    tau: float

    def _init_mask_state(self, shape: tuple[int, ...], activation_window: int, device: Any, dtype: Any) -> None:
        """Zero logits of `shape`, tau 1 and the activation history (the caller initialises the logits)."""
        self.tau = 1.0
        self.mask_logits = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("mask_history", torch.zeros(activation_window, device=device))
        self.register_buffer("history_count", torch.zeros((), dtype=torch.long, device=device))

    def soft_mask(self) -> Tensor:
        """A sample of the relaxed mask sigmoid((L + G) / tau), one value per logit; its mean goes into the
        activation history (pillar 3's "activations" importance)."""
        L = self.mask_logits
        m = self.settle(torch.sigmoid((L + logistic_noise(L.shape, L)) / self.tau))
        with torch.no_grad():
            slot = (self.history_count % self.mask_history.numel()).view(1)
            self.mask_history.index_copy_(0, slot, m.detach().mean().view(1).to(self.mask_history.dtype))
            self.history_count += 1
        return m

    def settle(self, m: Tensor) -> Tensor:
        """The relaxed sample as the forward uses it (masks that fix some values override this)."""
        return m

    def hard_mask(self) -> Tensor:
        return self.mask_logits > 0

    def expected_density(self) -> Tensor:
        """mean(sigmoid(L)): the expected fraction of kept weights, P(L + G > 0) for logistic G, at any tau."""
        return torch.sigmoid(self.mask_logits.float()).mean()

    def hard_density(self) -> Tensor:
        """Fraction of weights the hard mask keeps."""
        return self.hard_mask().float().mean()

    def realised_sparsity(self) -> float:
        return 1.0 - float(self.hard_density())


class MaskedLinear(MaskLogits, nn.Linear):
    """nn.Linear with learned mask logits over its weight: per weight, or per block of output or input channels.

    It holds the original weight and bias Parameters (no copy), so optimizers, ties and peft wrappers keep
    working; peft's LoRA / IA3 layers wrap it like any nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kind: str, side: Optional[str],
                 block_size: int, activation_window: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.kind, self.side, self.block_size = kind, side, block_size
        self.last_sample: Optional[Tensor] = None
        if kind == "unstructured":
            shape: tuple[int, ...] = (out_features, in_features)
        else:
            n = out_features if side == "out" else in_features
            if n % block_size:
                raise ValueError(f"block_size {block_size} does not divide the {n} {side}put channels of a "
                                 f"{in_features}->{out_features} projection; choose a divisor of {n}")
            shape = (n // block_size,)
        self._init_mask_state(shape, activation_window, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: MaskConfig, proj: str) -> "MaskedLinear":
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg.kind,
                     cfg.side_for(proj) if cfg.kind == "structured" else None, cfg.block_size,
                     cfg.activation_window, device="meta", dtype=w.dtype)
        module.weight, module.bias = linear.weight, linear.bias      # the same Parameters, not copies
        module._init_mask_state(tuple(module.mask_logits.shape), cfg.activation_window, w.device, w.dtype)
        with torch.no_grad():
            module.mask_logits.normal_(cfg.init_logit, cfg.init_std)
        module.train(linear.training)
        return module

    @property
    def n_weights(self) -> int:
        """Weights this mask covers (from the shape: under ZeRO-3 a partitioned weight's numel() is 0)."""
        return self.in_features * self.out_features

    def reset_parameters(self) -> None:   # weights come from the wrapped layer; nothing to initialise
        if self.weight.device.type != "meta":
            super().reset_parameters()

    # ------------------------------------------------------------------------------------------ masks
    def expand(self, m: Tensor) -> Tensor:
        """Per-logit values -> a tensor broadcastable against the weight (out, in)."""
        if self.kind == "unstructured":
            return m
        m = m.repeat_interleave(self.block_size)
        return m[:, None] if self.side == "out" else m[None, :]

    def current_mask(self) -> Tensor:
        """What the last forward multiplied the weight by, broadcastable against it: the relaxed sample of the last
        training forward (with its graph), or the hard mask in evaluation. Pillar 3's LoRA path reuses it so that
        the adapter's update is masked exactly like the base weight."""
        if self.training and self.last_sample is not None:
            return self.expand(self.last_sample.to(self.weight.dtype))
        return self.expand(self.hard_mask().to(self.weight.dtype))

    def kept_channels(self) -> Tensor:
        """Indices of the channels a structured hard mask keeps (on its side)."""
        return self.hard_mask().repeat_interleave(self.block_size).nonzero().squeeze(1)

    @property
    def gathers(self) -> bool:
        """Whether the evaluation forward runs a smaller dense matmul over the kept channels only."""
        return self.kind == "structured" and (self.side == "in" or self.in_features >= GATHER_MIN_FAN_IN)

    def executed_flops(self, tokens: int = 1) -> int:
        """Multiply-add FLOPs (2 per MAC) of the evaluation forward for `tokens` tokens."""
        if not self.gathers:
            return 2 * tokens * self.out_features * self.in_features
        kept = int(self.hard_mask().sum()) * self.block_size
        return 2 * tokens * kept * (self.in_features if self.side == "out" else self.out_features)

    def forward_flops(self, tokens: int, training: bool) -> tuple[int, int]:
        """(matmul, elementwise) FLOPs of one forward over `tokens` tokens (adaptive_mamba.flops): training runs
        the dense matmul and the mask product (2 per weight); evaluation its executed_flops, plus the mask product
        unless it gathers."""
        dense = 2 * tokens * self.in_features * self.out_features
        return (dense if training else self.executed_flops(tokens),
                2 * self.in_features * self.out_features if training or not self.gathers else 0)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            m = self.last_sample = self.soft_mask()
            return F.linear(x, self.weight * self.expand(m.to(self.weight.dtype)), self.bias)
        if not self.gathers:
            return F.linear(x, self.weight * self.expand(self.hard_mask().to(self.weight.dtype)), self.bias)
        kept = self.kept_channels()
        weight = self.weight.index_select(0 if self.side == "out" else 1, kept)
        return compact_linear(x, weight, self.bias, kept, self.side, self.out_features)


def compact_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], kept: Tensor, side: str,
                   out_features: int) -> Tensor:
    """The forward of a structured hard mask as a smaller dense matmul. `weight` holds only the kept rows
    (side "out") or columns (side "in") of the full weight, `kept` their indices, `bias` is the full bias. Equals
    x W'^T + b with W' the full weight with dropped rows/columns zeroed (dropped outputs get the bias alone).

    Side "out" computes the kept outputs channel-major, (kept, tokens), so that placing them in the full output is
    a copy of whole contiguous rows; the result is returned as a transposed view (the mixer transposes the outputs
    of in_proj and dt_proj to channel-major next anyway)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if side == "in":
        return F.linear(x2.index_select(1, kept), weight, bias).view(*lead, -1)
    part = torch.mm(weight, x2.t())                                       # (kept, tokens)
    full = part.new_empty(out_features, x2.shape[0])
    dropped = torch.ones(out_features, dtype=torch.bool, device=kept.device).index_fill_(0, kept, False)
    dropped = dropped.nonzero().squeeze(1)
    if bias is None:
        full.index_copy_(0, kept, part).index_fill_(0, dropped, 0.0)
    else:
        b = bias.to(part.dtype)[:, None]
        full.index_copy_(0, kept, part + b.index_select(0, kept))
        full.index_copy_(0, dropped, b.index_select(0, dropped).expand(-1, x2.shape[0]))
    return full.t().view(*lead, out_features)


class CompactLinear(nn.Module):
    """A compiled hard mask: for gathering structured masks the kept rows/columns only (a smaller dense weight),
    otherwise the masked dense weight. Same input and output shapes as the layer it replaces."""

    def __init__(self, source: MaskedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.side = source.in_features, source.out_features, source.side
        with torch.no_grad():
            if not source.gathers:
                self.side = None
                self.weight = nn.Parameter(source.weight * source.expand(source.hard_mask().to(source.weight.dtype)),
                                           requires_grad=False)
                self.register_buffer("kept", None)
            else:
                kept = source.kept_channels()
                self.weight = nn.Parameter(source.weight.index_select(0 if self.side == "out" else 1, kept).clone(),
                                           requires_grad=False)
                self.register_buffer("kept", kept)
            self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone(),
                                                                      requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kept is None:
            return F.linear(x, self.weight, self.bias)
        return compact_linear(x, self.weight, self.bias, self.kept, self.side, self.out_features)

    def executed_flops(self, tokens: int = 1) -> int:
        return 2 * tokens * self.weight.numel()

    def forward_flops(self, tokens: int, training: bool) -> tuple[int, int]:
        """(matmul, elementwise) FLOPs of one forward: the compiled weight's matmul, in either mode."""
        return self.executed_flops(tokens), 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={tuple(self.weight.shape)}"


class ChannelMask(MaskLogits, nn.Module):
    """One logit per d_inner channel of a mixer (mixer.channel_mask): a dropped channel is removed everywhere it
    lives (in_proj x and z rows, conv filter, dt_proj row, A_log and D rows, x_proj and out_proj columns).

    The mixer multiplies its scan input u and its gated scan output y by `self()` (d_inner,): a relaxed sample in
    training, the hard mask at evaluation. A channel with u = 0 adds nothing to x_proj (its column is inert) and one
    with y = 0 adds nothing to out_proj; everything else of the channel only feeds its own y. So at evaluation the
    mixer instead runs `compact_mixer`, a mixer of the kept channels only (conv, scan and every projection
    shrink), which equals the dense masked one.

    In training, a channel whose keep probability sigmoid(L) is below `hard_threshold` is exactly 0 (above
    1 - hard_threshold exactly 1; both without noise, so its logit then learns from the regulariser alone), and the
    mixer computes only the channels whose value is not exactly 0 (`computed_channels`; a relaxed sample that
    underflows to 0 counts too): gathered projections, conv and scan over those channels, with the loss and every
    gradient of the dense masked forward. `sparse_training = False` runs the dense masked forward instead."""

    def __init__(self, mixer: nn.Module, cfg: MaskConfig, model_config: Any) -> None:
        super().__init__()
        self.model_config = model_config        # the shapes of the compact mixer (compact_mixer)
        w = mixer.A_log
        self._init_mask_state((mixer.d_inner,), cfg.activation_window, w.device, w.dtype)
        with torch.no_grad():
            self.mask_logits.normal_(cfg.init_logit, cfg.init_std)
        self.kind = "channel"
        self.hard_threshold = cfg.hard_threshold
        self.sparse_training = True
        # every mixer weight is indexed by a d_inner channel except out_proj's bias (counted from shapes: ZeRO-3 safe)
        per_channel = sum(p.numel() for n, p in mixer.named_parameters() if n != "out_proj.bias")
        self.weights_per_channel = per_channel // mixer.d_inner
        self.d_inner = mixer.d_inner

    @property
    def n_weights(self) -> int:
        return self.d_inner * self.weights_per_channel

    def kept_channels(self) -> Tensor:
        return self.hard_mask().nonzero().squeeze(1)

    def settle(self, m: Tensor) -> Tensor:
        """Channels beyond the hard threshold take their exact value: 0 below it, 1 above 1 - it."""
        if not self.hard_threshold:
            return m
        p = torch.sigmoid(self.mask_logits.detach().float())
        return m.masked_fill(p < self.hard_threshold, 0.0).masked_fill(p > 1.0 - self.hard_threshold, 1.0)

    def sparse_in_training(self, mixer: nn.Module) -> bool:
        """Whether training skips channels that are exactly 0: `sparse_training` is on and the weights are not
        ZeRO-3 partitions (which only their own module gathers)."""
        return self.sparse_training and not any(hasattr(p, "ds_id") for p in mixer.parameters())

    def training_width(self, mixer: nn.Module) -> int:
        """Channels a training forward computes at most: those the hard threshold does not fix at 0 (at least 1;
        a relaxed sample that underflows to 0 removes more), or every channel when training runs dense."""
        if not self.sparse_in_training(mixer):
            return self.d_inner
        return max(1, int((torch.sigmoid(self.mask_logits.detach().float()) >= self.hard_threshold).sum()))

    def computed_channels(self, mixer: nn.Module, m: Tensor) -> Optional[Tensor]:
        """Indices of the channels a training forward with mask values `m` computes: those not exactly 0 (when
        every one is 0, channel 0 alone, whose output is then multiplied by 0). None: every channel (none is 0,
        or not `sparse_in_training`)."""
        if not self.sparse_in_training(mixer):
            return None
        kept = (m.detach() != 0).nonzero().squeeze(1)        # one host sync per forward (nonzero's)
        if kept.numel() == m.numel():
            return None
        return kept if kept.numel() else kept.new_zeros(1)

    @staticmethod
    def gathers(mixer: nn.Module) -> bool:
        """Whether evaluation runs the compact mixer: its projections are plain (no adapter wrappers) and its
        weights are not ZeRO-3 partitions (gathered only inside their own module's forward). Otherwise the mixer
        runs the dense masked forward, which is equal but costs dense FLOPs."""
        return (all(type(getattr(mixer, name)) is nn.Linear for name in PROJECTIONS)
                and not any(hasattr(p, "ds_id") for p in mixer.parameters()))

    def compact(self, mixer: nn.Module) -> nn.Module:
        return compact_mixer(mixer, self)

    def forward(self) -> Tensor:
        """Per-channel multiplier (d_inner,): relaxed sample in training, hard 0/1 at evaluation."""
        return self.soft_mask() if self.training else self.hard_mask().to(self.mask_logits.dtype)


def channel_state(mixer: nn.Module, kept: Tensor) -> dict[str, Tensor]:
    """The state dict of a mixer reduced to the channels `kept` (indices; at least one). Needs plain projections
    (merge adapters and compile projection masks first)."""
    for name in PROJECTIONS:
        if type(getattr(mixer, name)) is not nn.Linear:
            raise ValueError(f"mixer.{name} is a {type(getattr(mixer, name)).__name__}: merge adapters before "
                             "gathering the channels of a channel mask")
    d = mixer.d_inner
    rows = {"in_proj": torch.cat([kept, kept + d]), "conv1d": kept, "dt_proj": kept, "A_log": kept, "D": kept}
    state = {}
    for name, p in mixer.named_parameters():
        head, leaf = name.split(".")[0], name.rsplit(".", 1)[-1]
        if head == "channel_mask":
            continue
        if head in rows:
            state[name] = p.detach().index_select(0, rows[head])
        elif D_INNER_SIDE.get(head) == "in" and leaf == "weight":   # x_proj, out_proj: d_inner columns
            state[name] = p.detach().index_select(1, kept)
        else:                                   # out_proj.bias
            state[name] = p.detach()
    return state


def compact_mixer(mixer: nn.Module, mask: ChannelMask) -> nn.Module:
    """A mixer of the channels `mask`'s hard mask keeps (a new MambaMixer of smaller d_inner, weights gathered).
    When it keeps none, one channel stays with a zero out_proj column, so the output is exactly out_proj's bias."""
    from adaptive_mamba.model import MambaMixer

    kept = mask.kept_channels()
    state = channel_state(mixer, kept if kept.numel() else mask.mask_logits.argmax().view(1))
    if not kept.numel():
        state["out_proj.weight"] = torch.zeros_like(state["out_proj.weight"])
    config = dataclasses.replace(mask.model_config, layer_d_inner=[state["D"].numel()] * mask.model_config.n_layer)
    with torch.device("meta"):
        compact = MambaMixer(config, mixer.layer_idx)
    compact.load_state_dict(state, assign=True)
    return compact.train(mixer.training)


# -------------------------------------------------------------------------------------------- model-level API
def masked_modules(model: "AdaptiveMambaForCausalLM") -> dict[str, MaskLogits]:
    """Every mask: {'blocks.i.mixer.proj': MaskedLinear} for masked projections (looking through peft wrappers) and
    {'blocks.i.mixer.channel_mask': ChannelMask} for channel masks."""
    found: dict[str, MaskLogits] = {}
    for i, block in enumerate(model.blocks):
        if getattr(block.mixer, "channel_mask", None) is not None:
            found[f"blocks.{i}.mixer.channel_mask"] = block.mixer.channel_mask
    found.update({name: base_layer(mod) for name, _, mod, _ in iter_projections(model)
                  if isinstance(base_layer(mod), MaskedLinear)})
    return found


def apply_masks(model: "AdaptiveMambaForCausalLM", cfg: MaskConfig) -> dict[str, MaskLogits]:
    """Wrap the target projections of the target layers in MaskedLinear (in place; weights are shared, not copied),
    or, for kind "channel", give each target layer's mixer a ChannelMask; set the starting temperature and record cfg in model.config.extra['masks']. Returns the new modules."""
    if masked_modules(model):
        raise ValueError("the model already has masks; apply_masks is applied once (load a saved model with "
                         "load_adaptive_model to restore masks)")
    added: dict[str, MaskLogits] = {}
    if cfg.kind == "channel":
        for name, mixer, _, _ in iter_projections(model, ("in_proj",), cfg.layers):
            if not ChannelMask.gathers(mixer):
                raise ValueError(f"{name} is not a plain nn.Linear: apply masks before adapters are injected")
            mixer.channel_mask = ChannelMask(mixer, cfg, model.config).train(mixer.training)
            added[name.replace("in_proj", "channel_mask")] = mixer.channel_mask
    for name, _, module, proj in ([] if cfg.kind == "channel" else iter_projections(model, cfg.targets, cfg.layers)):
        if module is not base_layer(module) or type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}, not a plain nn.Linear: apply masks before "
                             "adapters are injected (apply_allocation) and before compile_masks")
        parent, attr, _ = resolve_module(model, name)
        added[name] = MaskedLinear.from_linear(module, cfg, proj)
        setattr(parent, attr, added[name])
    set_temperature(model, cfg.tau_start)
    model.config.extra["masks"] = cfg.to_dict()
    return added


def temperature_at(step: int, cfg: MaskConfig) -> float:
    """tau at `step`: from tau_start to tau_end over anneal_steps (then constant), following cfg.schedule."""
    if cfg.schedule == "constant":
        return cfg.tau_start
    if cfg.anneal_steps is None:
        raise ValueError("MaskConfig.anneal_steps is None: set the number of annealing steps (training sets the "
                         "run's optimizer steps)")
    t = min(max(step, 0), cfg.anneal_steps) / cfg.anneal_steps
    a, b = cfg.tau_start, cfg.tau_end
    if cfg.schedule == "linear":
        return a + (b - a) * t
    if cfg.schedule == "exponential":
        return a * (b / a) ** t
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))


def set_temperature(model: "AdaptiveMambaForCausalLM", tau: float) -> None:
    if tau <= 0:
        raise ValueError(f"mask temperature must be > 0, got {tau}")
    for module in masked_modules(model).values():
        module.tau = float(tau)


def _weighted_sparsity(model: "AdaptiveMambaForCausalLM", density: str) -> Tensor:
    modules = list(masked_modules(model).values())
    if not modules:
        raise ValueError("the model has no masks: call apply_masks(model, MaskConfig(...)) first")
    sizes = [m.n_weights for m in modules]
    total = sum(sizes)
    return 1.0 - sum(getattr(m, density)() * (n / total) for m, n in zip(modules, sizes))


def expected_sparsity(model: "AdaptiveMambaForCausalLM") -> Tensor:
    """Differentiable expected fraction of masked weights, 1 - weighted mean of sigmoid(L) over masked modules."""
    return _weighted_sparsity(model, "expected_density")


def mask_regularizer(model: "AdaptiveMambaForCausalLM", cfg: MaskConfig) -> Tensor:
    """sparsity_weight * |sparsity - target_sparsity|, a scalar to add to the training loss. Its value uses the
    realised (hard-mask) sparsity; its gradient flows through the expected sparsity (straight-through), so the
    realised sparsity is what moves to the target."""
    soft = expected_sparsity(model)
    sparsity = _weighted_sparsity(model, "hard_density").to(soft.dtype) + (soft - soft.detach())
    return cfg.sparsity_weight * (sparsity - cfg.target_sparsity).abs()


def sparsity_report(model: "AdaptiveMambaForCausalLM", tokens: int = 1) -> dict[str, Any]:
    """Per masked (or compiled) module and in total: realised sparsity (fraction of weights the hard mask removes),
    dense FLOPs and executed FLOPs of the evaluation forward for `tokens` tokens. FLOPs are counted from the shapes
    that execute: a structured mask's gathered matmul, or the full dense matmul (unstructured masks, and structured
    output masks of layers below GATHER_MIN_FAN_IN inputs). A channel mask (or its compiled, channel-reduced mixer)
    is one entry per mixer whose FLOPs are the whole mixer's (projections, conv, scan; adaptive_mamba.flops)."""
    from adaptive_mamba.flops import mixer_flops

    modules: dict[str, dict[str, Any]] = {}
    dense_d_inner = model.config.d_inner
    for i, block in enumerate(model.blocks):
        mixer, mask = block.mixer, getattr(block.mixer, "channel_mask", None)
        if mask is None and mixer.d_inner == dense_d_inner:
            continue
        kept = mixer.d_inner if mask is None else int(mask.hard_mask().sum())
        executed = kept if mask is None or mask.gathers(mixer) else mixer.d_inner
        modules[f"blocks.{i}.mixer"] = {
            "kind": "channel" if mask is not None else "compiled", "sparsity": 1.0 - kept / dense_d_inner,
            "dense_flops": sum(mixer_flops(model.config, dense_d_inner, tokens).values()),
            "executed_flops": sum(mixer_flops(model.config, max(executed, 1), tokens).values()),
            "weights": sum(p.numel() for n, p in mixer.named_parameters() if "mask" not in n) * dense_d_inner
            // mixer.d_inner}
    for name, _, module, _ in iter_projections(model):
        layer = base_layer(module)
        dense = 2 * tokens * layer.in_features * layer.out_features
        if isinstance(layer, MaskedLinear):
            sparsity, kind = layer.realised_sparsity(), layer.kind
        elif isinstance(layer, CompactLinear):
            kind = "compiled"
            sparsity = 1.0 - (layer.weight.numel() / (layer.in_features * layer.out_features) if layer.kept is not None
                              else float((layer.weight != 0).float().mean()))
        else:
            continue
        modules[name] = {"kind": kind, "sparsity": sparsity, "dense_flops": dense,
                         "executed_flops": layer.executed_flops(tokens),
                         "weights": layer.in_features * layer.out_features}
    if not modules:
        raise ValueError("the model has no masks: call apply_masks(model, MaskConfig(...)) first")
    total = sum(r["weights"] for r in modules.values())
    return {"modules": modules,
            "sparsity": sum(r["sparsity"] * r["weights"] for r in modules.values()) / total,
            "dense_flops": sum(r["dense_flops"] for r in modules.values()),
            "executed_flops": sum(r["executed_flops"] for r in modules.values())}


def format_sparsity_report(report: dict[str, Any]) -> str:
    lines = [f"{name}: sparsity {r['sparsity']:.3f}  executed {r['executed_flops']:,} / dense {r['dense_flops']:,} "
             f"FLOPs ({r['kind']})" for name, r in report["modules"].items()]
    lines.append(f"total: sparsity {report['sparsity']:.3f}  executed {report['executed_flops']:,} / dense "
                 f"{report['dense_flops']:,} FLOPs ({report['executed_flops'] / report['dense_flops']:.3f})")
    return "\n".join(lines)


def compile_masks(model: "AdaptiveMambaForCausalLM") -> dict[str, nn.Module]:
    """Replace every MaskedLinear by a CompactLinear, and every mixer with a ChannelMask by a mixer of its kept
    channels only (recorded in config.layer_d_inner, so save_pretrained / from_pretrained round-trip it); for
    evaluation / export: the result has no mask logits and is not trainable. Adapters must be merged first: a peft wrapper around a mask is refused."""
    compiled: dict[str, nn.Module] = {}
    for name, module in masked_modules(model).items():
        if isinstance(module, ChannelMask):     # the mixer becomes a smaller mixer of the kept channels
            block = model.get_submodule(name.rsplit(".", 2)[0])
            if not module.gathers(block.mixer):
                raise ValueError(f"{name}: the mixer carries peft adapters: merge them before compile_masks")
            block.mixer = compiled[name] = module.compact(block.mixer.eval())
            continue
        parent, attr, attached = resolve_module(model, name)
        if attached is not module:
            raise ValueError(f"{name} carries a peft adapter: merge it (apply_allocation with every module 'frozen' "
                             "and on_kind_change='merge') before compile_masks")
        compiled[name] = CompactLinear(module)
        setattr(parent, attr, compiled[name])
    if any(n.endswith("channel_mask") for n in compiled):
        model.config.layer_d_inner = [b.mixer.d_inner for b in model.blocks]
    return compiled


__all__ = ["MASK_KINDS", "ChannelMask", "MaskConfig", "MaskedLinear", "CompactLinear", "compact_mixer", "PROJECTIONS",
           "apply_masks", "compile_masks",
           "compact_linear", "expected_sparsity", "format_sparsity_report", "mask_regularizer", "masked_modules",
           "set_temperature", "sparsity_report", "temperature_at"]
