"""Exact training on sequences of any length: chunks that carry the conv and SSM state, with exact gradients.

The selective scan is linear in its state, so one mixer over a piece of the sequence that starts from state h0
(and conv tail c0) splits into
    y      = scan(u, delta, A, B, C, D, z; h0 = 0)                   (the fused kernel, from zero)
           + silu(z_t) * <exp(A * sum_{s<=t} delta_s) * h0, C_t>     (the initial state's contribution)
    h_last = h_last(from zero) + exp(A * sum delta) * h0,
    h_last(from zero) = sum_t exp(A * sum_{s>t} delta_s) * delta_t * u_t * B_t.
Here the last two lines are written in differentiable torch (blocked, rematerialised), so gradients flow into
h0, c0 and out through h_last: the same mixer step serves within-rank chunking (this module) and context
parallelism across ranks (`context_parallel.py`), which differ only in where h0 and c0 come from (`Boundary`).

`chunked_lm_loss` is one autograd Function over the whole model. Its forward runs the chunks without a graph
and keeps only each chunk's incoming boundary states (per layer (B, d_inner, d_state) + (B, d_inner, d_conv-1));
its backward walks the chunks in reverse, recomputes each from its stored states (leaves), and back-propagates
the loss gradient plus the state gradients handed back by the next chunk. Memory is one chunk's activations plus
the boundary states; `engine.backward(loss)` works unchanged (the parameter gradients are returned once).

Every chunk sees the same random draws (mask noise) as a single pass would: the RNG is reset to the state at
the start of the step before each chunk and each recomputation. Side effects of a forward (module buffers such
as the masks' activation history) are those of one pass; observation hooks on `mixer.scan_input` (scan-order
statistics) see every token exactly once, in the forward, and are silenced while recomputing.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adaptive_mamba.model import AdaptiveMambaForCausalLM, LayerState, MambaBlock, MambaMixer, lm_loss
from adaptive_mamba.ops import selective_scan

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ state algebra
def _rematerialised(fn, *args):
    """fn(*args), keeping only its inputs for backward (recomputed there) when a graph is being built."""
    return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)


def _blocked(fn, length: int, block: int, *args: Tensor) -> list[Tensor]:
    """fn(slice, *args) for consecutive slices of the time axis, each rematerialised in backward, so the
    (B, d, block, N) intermediates of one block are the only ones alive."""
    return [_rematerialised(fn, slice(s, s + block), *args) for s in range(0, length, block)]


def _decay(log_decay: Tensor) -> Tensor:
    """exp(log_decay) with the exponent floored at -60: factors below e^-60 (~1e-26) would otherwise end as
    denormal floats, on which the CPU's elementwise ops run ~100x slower; the change is far below float32
    resolution of any output they feed."""
    return torch.exp(log_decay.clamp(min=-60.0))


def _zero_start_last_state(sl: slice, suffix: Tensor, A: Tensor, du: Tensor, B: Tensor) -> Tensor:
    return torch.einsum("bdtn,bdt,bnt->bdn", _decay(suffix[..., sl, None] * A[:, None]), du[..., sl], B[..., sl])


def _initial_state_output(sl: slice, cum: Tensor, A: Tensor, h0: Tensor, C: Tensor) -> Tensor:
    return torch.einsum("bdtn,bdn,bnt->bdt", _decay(cum[..., sl, None] * A[:, None]), h0, C[..., sl])


def state_terms(dt: Tensor, A: Tensor, u: Tensor, B: Tensor, block: int = 256) -> tuple[Tensor, Tensor]:
    """(final state of a scan from zero, total decay exp(A * sum dt)), both (B, d, N) float32 and differentiable.
    dt: softplus'ed delta (B, d, L) float32; A: (d, N); u: (B, d, L); B: (B, N, L)."""
    length = dt.shape[-1]
    incl = torch.flip(torch.cumsum(torch.flip(dt, [-1]), -1), [-1])            # sum_{s>=t}, accurate near the end
    suffix = torch.cat([incl[..., 1:], torch.zeros_like(incl[..., :1])], -1)   # sum_{s>t}
    parts = _blocked(_zero_start_last_state, length, block, suffix, A, dt * u.float(), B.float())
    return torch.stack(parts).sum(0), _decay(incl[..., :1] * A)


def initial_state_output(dt: Tensor, A: Tensor, C: Tensor, z: Tensor, h0: Tensor, block: int = 256) -> Tensor:
    """The initial state's share of the gated scan output, silu(z_t) * <exp(A * sum_{s<=t} dt_s) * h0, C_t>."""
    cum = torch.cumsum(dt, -1)
    y = torch.cat(_blocked(_initial_state_output, dt.shape[-1], block, cum, A, h0.float(), C.float()), -1)
    return y * F.silu(z.float())


# The mixer's state algebra from the raw delta, rematerialised as a whole: in backward it keeps only tensors the
# mixer holds anyway (delta, u, B, C, z), not its (B, d_inner, L) float32 intermediates.
def _state_terms_of(delta: Tensor, A: Tensor, u: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    return state_terms(F.softplus(delta.float()), A, u, B)


def _initial_state_output_of(delta: Tensor, A: Tensor, C: Tensor, z: Tensor, h0: Tensor) -> Tensor:
    return initial_state_output(F.softplus(delta.float()), A, C, z, h0)


# ----------------------------------------------------------------------------------------- mixer step
class Boundary(ABC):
    """Where a mixer's incoming conv tail and SSM state come from, and what happens to its outgoing ones."""

    @abstractmethod
    def conv_tail(self, mixer: MambaMixer, x: Tensor) -> Tensor:
        """The d_conv - 1 conv inputs before this piece, given this piece's conv input x (B, d_inner, L)."""

    @abstractmethod
    def initial_state(self, mixer: MambaMixer, last_from_zero: Tensor, decay: Tensor) -> Tensor:
        """The SSM state before this piece, given this piece's final state from zero and its total decay."""


def mixer_forward(mixer: MambaMixer, hidden: Tensor, boundary: Boundary) -> Tensor:
    """MambaMixer.forward on one piece of a sequence, continuing from the states `boundary` supplies, with
    gradients through those states. Calls the mixer's modules, so masks, adapters and hooks take effect."""
    length, pad = hidden.shape[1], mixer.d_conv - 1
    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)              # (B, d_inner, L) each
    conv_in = torch.cat([boundary.conv_tail(mixer, x).to(x.dtype), x], dim=-1)
    u = mixer.scan_input(F.silu(mixer.conv1d(conv_in)[..., pad:pad + length]))
    dt_in, B, C = torch.split(mixer.x_proj(u.transpose(1, 2)), [mixer.dt_rank, mixer.d_state, mixer.d_state], -1)
    delta = mixer.dt_proj(dt_in).transpose(1, 2)                              # (B, d_inner, L), bias included
    A = -torch.exp(mixer.A_log.float())
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    y = selective_scan(u, delta, A, B, C, mixer.D.float(), z, delta_softplus=True)
    h0 = boundary.initial_state(mixer, *_rematerialised(_state_terms_of, delta, A, u, B))
    y = (y.float() + _rematerialised(_initial_state_output_of, delta, A, C, z, h0)).to(y.dtype)
    return mixer.out_proj(y.transpose(1, 2).to(hidden.dtype))


def block_forward(block: MambaBlock, hidden: Tensor, boundary: Boundary) -> Tensor:
    """MambaBlock.forward (pre-norm residual) around `mixer_forward`."""
    residual = hidden.float() if block.residual_in_fp32 else hidden
    return residual + mixer_forward(block.mixer, block.norm(hidden.to(block.norm.weight.dtype)), boundary)


def shifted_targets(labels: Tensor) -> Tensor:
    """targets[t] = labels[t + 1] (the token position t predicts), IGNORE_INDEX at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def target_count(labels: Tensor) -> int:
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("every label is -100 (ignored): there is nothing to compute a loss on")
    return count


def piece_loss_sum(model: AdaptiveMambaForCausalLM, input_ids: Tensor, targets: Tensor,
                   boundaries: list[Boundary]) -> Tensor:
    """Summed next-token cross-entropy of one piece (targets already shifted) with each layer continuing from
    its boundary. The logits are computed a few thousand positions at a time (`lm_loss`)."""
    h = model.embedding(input_ids)
    for block, boundary in zip(model.blocks, boundaries):
        h = block_forward(block, h, boundary)
    hidden = model.norm_f(h.to(model.norm_f.weight.dtype))
    count = int((targets != IGNORE_INDEX).sum())
    if count == 0:
        return hidden.sum() * 0.0
    # lm_loss pairs hidden[t] with labels[t + 1]: one padding row / one ignored label line the targets up.
    labels = F.pad(targets, (1, 0), value=IGNORE_INDEX)
    return lm_loss(model.lm_head, F.pad(hidden, (0, 0, 0, 1)), labels) * count


# ------------------------------------------------------------------------------------ chunked training
@dataclass
class CarriedState(Boundary):
    """A chunk's incoming states (given) and outgoing states (recorded as the chunk runs)."""

    conv: Tensor
    ssm: Tensor
    conv_out: Optional[Tensor] = None
    ssm_out: Optional[Tensor] = None

    def conv_tail(self, mixer: MambaMixer, x: Tensor) -> Tensor:
        conv_in = torch.cat([self.conv.to(x.dtype), x], dim=-1)
        self.conv_out = conv_in[..., conv_in.shape[-1] - (mixer.d_conv - 1):]
        return self.conv

    def initial_state(self, mixer: MambaMixer, last_from_zero: Tensor, decay: Tensor) -> Tensor:
        self.ssm_out = decay * self.ssm + last_from_zero
        return self.ssm

    def outgoing(self) -> LayerState:
        return LayerState(self.conv_out, self.ssm_out)


def _rng_state(device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple[Tensor, Optional[Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def _scan_hooks_silenced(model: AdaptiveMambaForCausalLM) -> Iterator[None]:
    """Recomputation must not feed the scan-order statistics a second time."""
    saved = [(b.mixer.scan_input, b.mixer.scan_input._forward_hooks) for b in model.blocks]
    for module, _ in saved:
        module._forward_hooks = type(module._forward_hooks)()
    try:
        yield
    finally:
        for module, hooks in saved:
            module._forward_hooks = hooks


def _buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, value in saved:
            buf.copy_(value)


class _ChunkedLoss(torch.autograd.Function):
    """loss = sum over chunks of the chunk's cross-entropy sum / count; see the module docstring."""

    @staticmethod
    def forward(ctx, model, input_ids, labels, chunk_len, *params):  # type: ignore[override]
        device = input_ids.device
        targets, count = shifted_targets(labels), target_count(labels)
        bounds = [(s, min(s + chunk_len, input_ids.shape[1])) for s in range(0, input_ids.shape[1], chunk_len)]
        rng = _rng_state(device)
        weight = model.embedding.weight
        states = [b.mixer.zero_state(input_ids.shape[0], device, weight.dtype) for b in model.blocks]
        incoming, total = [], torch.zeros((), dtype=torch.float32, device=device)
        for k, (s, e) in enumerate(bounds):
            _set_rng_state(rng, device)
            incoming.append(states)
            carried = [CarriedState(st.conv, st.ssm) for st in states]
            total = total + piece_loss_sum(model, input_ids[:, s:e], targets[:, s:e], carried).float()
            states = [c.outgoing() for c in carried]
            if k == 0:
                after_first = _rng_state(device), _buffers(model)
        _set_rng_state(after_first[0], device)
        _restore(after_first[1])
        ctx.model, ctx.bounds, ctx.rng, ctx.incoming, ctx.count = model, bounds, rng, incoming, count
        ctx.save_for_backward(input_ids, targets, *params)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        model, device = ctx.model, grad_loss.device
        input_ids, targets, *params = ctx.saved_tensors
        param_grads: list[Optional[Tensor]] = [None] * len(params)
        state_grads: list[Tensor] = []
        rng_now, buffers_now = _rng_state(device), _buffers(model)
        for k in reversed(range(len(ctx.bounds))):
            s, e = ctx.bounds[k]
            leaves = [t.detach().requires_grad_(k > 0) for st in ctx.incoming[k] for t in (st.conv, st.ssm)]
            carried = [CarriedState(leaves[2 * i], leaves[2 * i + 1]) for i in range(len(model.blocks))]
            _set_rng_state(ctx.rng, device)
            with torch.enable_grad(), _scan_hooks_silenced(model):
                loss = piece_loss_sum(model, input_ids[:, s:e], targets[:, s:e], carried)
            outputs = [(loss, grad_loss / ctx.count)]
            if state_grads:
                outgoing = [t for c in carried for t in (c.conv_out, c.ssm_out)]
                outputs += list(zip(outgoing, state_grads))
            outputs = [(o, g) for o, g in outputs if o.requires_grad]
            wrt = list(params) + (leaves if k > 0 else [])
            grads = torch.autograd.grad([o for o, _ in outputs], wrt, [g for _, g in outputs],
                                        allow_unused=True) if outputs else [None] * len(wrt)
            for i, g in enumerate(grads[:len(params)]):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            state_grads = [torch.zeros_like(leaf) if g is None else g
                           for leaf, g in zip(leaves, grads[len(params):])]
        _set_rng_state(rng_now, device)
        _restore(buffers_now)
        return (None, None, None, None, *param_grads)


def chunked_lm_loss(model: AdaptiveMambaForCausalLM, input_ids: Tensor, labels: Tensor, chunk_len: int) -> Tensor:
    """Mean next-token cross-entropy of the whole sequence (as `model(input_ids, labels=labels).loss`), computed
    `chunk_len` tokens at a time with the state carried across chunks and exact gradients (see module doc)."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1 token, got {chunk_len}")
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and labels must both be (batch, length); got {tuple(input_ids.shape)} and "
                         f"{tuple(labels.shape)}")
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    return _ChunkedLoss.apply(model, input_ids, labels, chunk_len, *params)


__all__ = ["Boundary", "CarriedState", "block_forward", "chunked_lm_loss", "initial_state_output", "mixer_forward",
           "piece_loss_sum", "shifted_targets", "state_terms", "target_count"]
