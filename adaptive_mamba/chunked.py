"""Exact training on sequences of any length: chunks that carry the conv and SSM state, with exact gradients.

A mixer over a piece of the sequence continues from the conv tail c0 (the d_conv - 1 inputs before the piece)
and the SSM state h0 before it. The selective scan takes h0 and returns its last state, with gradients through
both (`adaptive_mamba.ops.selective_scan`: the C++ kernel on the CPU, the linear state algebra on other devices),
so the same mixer step serves within-rank chunking (this module: h0 is the previous chunk's last state) and
context parallelism across ranks (`context_parallel.py`: h0 is assembled from the other ranks' pieces). They
differ only in where c0 and h0 come from (`Boundary`).

`chunked_lm_loss` is one autograd Function over the whole model. Its forward runs the chunks without a graph
and keeps only each chunk's incoming boundary states (per layer (B, d_inner, d_state) + (B, d_inner, d_conv-1));
its backward walks the chunks in reverse, recomputes each from its stored states (leaves), and back-propagates
the loss gradient plus the state gradients handed back by the next chunk. Memory is one chunk's activations plus
the boundary states (with `gradient_checkpointing`, one block's activations of one chunk); `engine.backward(loss)`
works unchanged (the parameter gradients are returned once).

Every chunk sees the same random draws (mask noise) as a single pass would: the RNG is reset to the state at
the start of the step before each chunk and each recomputation. Side effects of a forward (module buffers such
as the masks' activation history) are those of one pass; observation hooks on `mixer.scan_input` (scan-order
statistics) see every token exactly once, in the forward, and are silenced while recomputing.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adaptive_mamba.model import AdaptiveMambaForCausalLM, LayerState, MambaBlock, MambaMixer, lm_loss
from adaptive_mamba.ops import causal_conv1d_silu, selective_scan, state_decay

IGNORE_INDEX = -100

ScanFrom = Callable[[Optional[Tensor], bool], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------- mixer step
class Boundary(ABC):
    """Where a mixer's incoming conv tail and SSM state come from, and what happens to its outgoing ones."""

    @abstractmethod
    def conv_tail(self, mixer: MambaMixer, x: Tensor) -> Tensor:
        """The d_conv - 1 conv inputs before this piece (B, d_inner, d_conv - 1), given this piece's conv input
        x (B, d_inner, L)."""

    @abstractmethod
    def scan(self, scan_from: ScanFrom, decay: Callable[[], Tensor]) -> Tensor:
        """This piece's gated scan output. scan_from(h0, gated) scans the piece from SSM state h0 (None: zero) and
        returns (output, last state), both differentiable (gated=False skips the D skip and the gate, for a
        scan whose output is not used); decay() is the share of an incoming state left at the end."""


def conv_after(conv: nn.Module, x: Tensor, tail: Tensor) -> Tensor:
    """silu(causal depthwise conv) of x (B, L, d) continuing from the `tail` (B, d, d_conv - 1) of inputs before
    it, (B, L, d). The fused kernel over the piece from a zero history is exact from position d_conv - 1 on; the
    first d_conv - 1 positions are recomputed with the tail (a second call of the conv module on d_conv - 1 steps,
    so any deterministic conv, plain or wrapped by an adapter, gives the one-pass result)."""
    pad = tail.shape[-1]
    head = min(pad, x.shape[1])
    first = conv(torch.cat([tail.to(x.dtype), x[:, :head].transpose(1, 2)], -1))[..., pad:pad + head]
    return torch.cat([F.silu(first).transpose(1, 2), causal_conv1d_silu(x, conv)[:, head:]], dim=1)


def mixer_forward(mixer: MambaMixer, hidden: Tensor, boundary: Boundary) -> Tensor:
    """MambaMixer.forward (training, no cache) on one piece of a sequence, continuing from the states `boundary`
    supplies, with gradients through them. Calls the mixer's modules, so masks, adapters and hooks take effect;
    activations stay (B, L, d_inner), as in the one-pass path."""
    keep = None if mixer.channel_mask is None else mixer.channel_mask()[:, None]          # (d_inner, 1)
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)                                         # (B, L, d_inner) views
    u = conv_after(mixer.conv1d, x, boundary.conv_tail(mixer, x.transpose(1, 2))).transpose(1, 2)
    if keep is not None:                        # masked before the statistics hook, as in the one-pass mixer
        u = u * keep.to(u.dtype)
    u = mixer.scan_input(u)
    dt_in, B, C = torch.split(mixer.x_proj(u.transpose(1, 2)), [mixer.dt_rank, mixer.d_state, mixer.d_state], -1)
    dt = F.softplus(mixer.dt_proj(dt_in).transpose(1, 2).float())          # (B, d_inner, L), once for both scans
    A = -torch.exp(mixer.A_log.float())

    def scan_from(h0: Optional[Tensor], gated: bool = True) -> tuple[Tensor, Tensor]:
        skip, gate = (mixer.D.float(), z.transpose(1, 2)) if gated else (None, None)
        return selective_scan(u, dt, A, B.transpose(1, 2), C.transpose(1, 2), skip, gate, return_last_state=True,
                              initial_state=h0)

    y = boundary.scan(scan_from, lambda: state_decay(dt, A))
    if keep is not None:
        y = y * keep.to(y.dtype)
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
    its boundary. The logits are computed a few thousand positions at a time (`lm_loss`); with the model's
    `gradient_checkpointing`, each block keeps only its input for backward and is recomputed there (with its
    boundary exchange: every rank recomputes the same blocks in the same order)."""
    h = model.embedding(input_ids)
    ckpt = model.config.gradient_checkpointing and model.training and torch.is_grad_enabled()
    for block, boundary in zip(model.blocks, boundaries):
        h = checkpoint(block_forward, block, h, boundary, use_reentrant=False) if ckpt else \
            block_forward(block, h, boundary)
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
        # the outgoing tail: the last d_conv - 1 conv inputs up to this chunk's end (a chunk shorter than the tail
        # passes part of its incoming tail on)
        pad = mixer.d_conv - 1
        recent = torch.cat([self.conv.to(x.dtype), x[..., max(0, x.shape[-1] - pad):]], dim=-1)
        self.conv_out = recent[..., recent.shape[-1] - pad:]
        return self.conv

    def scan(self, scan_from: ScanFrom, decay: Callable[[], Tensor]) -> Tensor:
        y, self.ssm_out = scan_from(self.ssm, True)
        return y

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


__all__ = ["Boundary", "CarriedState", "block_forward", "chunked_lm_loss", "conv_after", "mixer_forward",
           "piece_loss_sum", "shifted_targets", "target_count"]
