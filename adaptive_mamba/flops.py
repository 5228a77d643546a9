"""Executed FLOPs of the whole model, forward and training step, counted from the shapes that actually run.

    mixer_flops(config, d_inner, seq_len)     one mixer's forward over one sequence, by component
    model_flops(model, seq_len, batch)        FlopCount: forward by component (embedding, lm_head, norms, and per
                                              mixer in_proj, conv, x_proj, dt_proj, scan, out_proj, adapters) and the
                                              training step

Conventions. A multiply-add is 2 FLOPs. The conv is counted over every output torch computes (the causal padding
yields seq_len + d_conv - 1 outputs, of which the last d_conv - 1 are dropped). The scan counts its elementwise
arithmetic: per (token, channel, state) 7 (exp(delta A): 2, delta u B: 1, h = dA h + dBu: 2, C h accumulate: 2),
per (token, channel) 7 (softplus of delta: 1, delta u: 1, D u + y: 2, silu(z): 2, gate: 1). The embedding is a
lookup (0); RMSNorm costs 4 per element. The matmul and conv counts equal torch.utils.flop_counter.FlopCounterMode's
(tests/test_flops.py); the elementwise counts are this module's convention.

What executes depends on the modules, and a masked or compiled layer says it itself (its `forward_flops`): a
MaskedLinear at evaluation its executed_flops (gathered or dense), in training the dense matmul plus the mask product
(2 per weight); a CompactLinear its smaller weight; a mixer with a ChannelMask at evaluation the kept channels only
(compact mixer), in training the channels its hard threshold does not fix at 0 (ChannelMask.training_width; an
adapter-wrapped projection at full width); LoRA adds 2 T (in r + r out) + 2 T out (scale, add), IA3 one multiply per
scaled feature.

Training step = forward + backward (+ one more forward of every block under activation checkpointing). Backward:
each matmul and the conv cost their forward once for the input gradient, and once more for the weight gradient when
that weight (or a mask over it) trains; lm_loss computes the logits of the seq_len - 1 predicted positions and
recomputes them in backward; elementwise work (scan, norms, masks) costs twice its forward. FlopCounterMode agrees
on every matmul of the step; it counts the depthwise conv's backward as if it were dense (groups ignored), so the
conv backward is this module's count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from adaptive_mamba.pillars.common import PROJECTIONS, base_layer

if TYPE_CHECKING:
    from adaptive_mamba.model import AdaptiveMambaForCausalLM

SCAN_PER_STATE = 7
SCAN_PER_CHANNEL = 7
NORM_PER_ELEMENT = 4


def mixer_flops(config: Any, d_inner: int, seq_len: int) -> dict[str, int]:
    """Dense forward FLOPs of one mixer with `d_inner` channels over one sequence of `seq_len` tokens."""
    L, d, N, r = seq_len, d_inner, config.d_state, config.resolved_dt_rank
    return {"in_proj": 2 * L * config.d_model * 2 * d,
            "conv": 2 * (L + config.d_conv - 1) * d * config.d_conv,
            "x_proj": 2 * L * d * (r + 2 * N),
            "dt_proj": 2 * L * r * d,
            "scan": L * d * (SCAN_PER_STATE * N + SCAN_PER_CHANNEL),
            "out_proj": 2 * L * d * config.d_model}


@dataclass
class FlopCount:
    """FLOPs of one forward / training step over `batch` sequences of `seq_len` tokens."""

    forward: dict[str, int]            # component -> FLOPs ("blocks.i.mixer.in_proj", "lm_head", ...)
    matmul: dict[str, int]             # the matmul / conv part of each component (what FlopCounterMode sees)
    training_step: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    def per_token(self) -> dict[str, float]:
        return {"forward": self.forward_total / self.tokens, "training_step": self.training_step / self.tokens}


def _linear(module: nn.Module, tokens: int, training: bool) -> tuple[int, int, int, bool]:
    """(matmul FLOPs, adapter FLOPs, elementwise FLOPs, weight trains) of one projection as attached."""
    layer = base_layer(module)
    counted = getattr(layer, "forward_flops", None)      # masked and compiled layers count what they execute
    matmul, elementwise = (counted(tokens, training) if counted is not None
                           else (2 * tokens * layer.in_features * layer.out_features, 0))
    trains = any(p.requires_grad for p in layer.parameters())
    adapter = 0
    for name, sub in module.named_modules():
        if name.startswith(("lora_A.", "lora_B.")) and isinstance(sub, nn.Linear):
            adapter += 2 * tokens * sub.in_features * sub.out_features
            adapter += 2 * tokens * sub.out_features if name.startswith("lora_B.") else 0     # scale and add
    adapter += sum(tokens * p.numel() for name, p in module.named_parameters() if name.startswith("ia3_l."))
    return matmul, adapter, elementwise, trains


def _count(model: "AdaptiveMambaForCausalLM", seq_len: int, batch: int,
           training: bool) -> tuple[dict[str, int], dict[str, int], int]:
    """(forward FLOPs by component, their matmul/conv part, backward FLOPs) with masks in the given mode."""
    cfg, T = model.config, batch * seq_len
    forward: dict[str, int] = {"embedding": 0}
    matmul: dict[str, int] = {}
    backward = 0

    def add(name: str, mm: int, other: int, weight_trains: bool) -> None:
        nonlocal backward
        forward[name] = mm + other
        if mm:
            matmul[name] = mm
        backward += mm * (2 if weight_trains else 1) + 2 * other

    for i, block in enumerate(model.blocks):
        mixer, prefix = block.mixer, f"blocks.{i}.mixer"
        add(f"blocks.{i}.norm", 0, NORM_PER_ELEMENT * T * cfg.d_model, False)
        mask = getattr(mixer, "channel_mask", None)
        if mask is not None and not training and mask.gathers(mixer):     # the compact mixer of the kept channels
            comps = mixer_flops(cfg, max(1, int(mask.hard_mask().sum())), seq_len)
            for comp, value in comps.items():
                add(f"{prefix}.{comp}", 0 if comp == "scan" else batch * value,
                    batch * value if comp == "scan" else 0, False)
            continue
        # channel-sparse training: the channels the mask does not fix at 0 (plain projections gathered)
        width = mask.training_width(mixer) if mask is not None and training else mixer.d_inner
        comps = mixer_flops(cfg, width, seq_len)
        for proj in PROJECTIONS:
            module = getattr(mixer, proj)
            mm, adapter, elementwise, trains = _linear(module, T, training)
            if width < mixer.d_inner and type(module) is nn.Linear:
                mm = batch * comps[proj]
            add(f"{prefix}.{proj}", mm, elementwise, trains)
            if adapter:     # trainable: input and weight gradients, counted as 2x forward
                add(f"{prefix}.{proj}.adapter", 0, adapter, False)
        add(f"{prefix}.conv", batch * comps["conv"], 0, mixer.conv1d.weight.requires_grad)
        scan = batch * comps["scan"] + (2 * T * width if mask is not None else 0)   # u and y times the mask
        add(f"{prefix}.scan", 0, scan, False)
    add("norm_f", 0, NORM_PER_ELEMENT * T * cfg.d_model, False)
    # training computes the loss only (lm_loss: the seq_len - 1 positions with a next token, never the full logits)
    head = 2 * batch * (seq_len - 1 if training else seq_len) * cfg.d_model * cfg.padded_vocab_size
    add("lm_head", head, 0, model.lm_head.weight.requires_grad)
    if training:
        backward += head      # lm_loss recomputes each chunk's logits in backward
    return forward, matmul, backward


def model_flops(model: "AdaptiveMambaForCausalLM", seq_len: int, batch: int = 1) -> FlopCount:
    """Forward FLOPs of `model` in its current mode (train / eval; logits of every position) and the FLOPs of one
    training step (the loss of the seq_len - 1 predicted positions), for `batch` sequences of `seq_len` tokens."""
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got {seq_len}, {batch}")
    forward, matmul, _ = _count(model, seq_len, batch, model.training)
    train_forward, _, backward = _count(model, seq_len, batch, True)
    step = sum(train_forward.values()) + backward
    notes = ["backward: input gradient of every matmul, weight gradient of trainable ones, 2x elementwise"]
    if model.config.gradient_checkpointing:
        step += sum(v for k, v in train_forward.items() if k.startswith("blocks."))
        notes.append("activation checkpointing: every block's forward runs twice")
    return FlopCount(forward=forward, matmul=matmul, training_step=step, tokens=batch * seq_len, notes=notes)


def format_flops(count: FlopCount) -> str:
    """Per-token summary by component group (projections, adapters, conv, scan, norms, lm_head)."""
    groups: dict[str, int] = {}
    for name, value in count.forward.items():
        group = name.rsplit(".", 1)[-1] if name.startswith("blocks.") else name
        group = "adapters" if group == "adapter" else "projections" if group in PROJECTIONS else group
        groups[group] = groups.get(group, 0) + value
    parts = ", ".join(f"{k} {v / count.tokens:,.0f}" for k, v in groups.items() if v)
    per = count.per_token()
    return (f"FLOPs per token: forward {per['forward']:,.0f} ({parts}); training step {per['training_step']:,.0f}")


__all__ = ["FlopCount", "format_flops", "mixer_flops", "model_flops"]
