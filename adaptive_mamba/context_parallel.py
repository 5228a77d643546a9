"""Context parallelism: one sequence split into contiguous pieces over the ranks of a group, exact gradients.

Rank r of a context-parallel group of size P holds piece r of every sequence (`piece_bounds`). Layer by layer:
  1. the d_conv - 1 last conv inputs of each piece go to the next rank (all-gather of (B, d_inner, d_conv-1));
  2. each rank scans its piece from a zero state for its piece's final state from zero, H_r (the fused kernel's
     last state), and takes its total decay, P_r = exp(A * sum delta) (`ops.state_decay`);
  3. one all-gather of (H, P) ((B, d_inner, d_state) each) gives every rank its true initial state by a prefix,
     h0_r = sum_{j<r} (prod_{j<k<r} P_k) H_j, with no rank waiting for another's result;
  4. each rank scans its piece again from h0_r (the fused kernel takes an initial state) for its outputs.
So each rank scans its piece twice (2 / P of one pass's scan work) and no rank waits on another's scan.
The backward is the mirror image: the kernel's backward of step 4 gives each rank g_r = dL/dh0_r from its own
outputs; these are all-gathered and the adjoint prefix lambda_q = g_q + P_q * lambda_{q+1} (from the last rank
down) gives each rank the gradient of its H_r and P_r, which the backward of step 2 (the kernel's backward with
a last-state gradient) turns into parameter gradients; the conv tails' gradients go back to their senders. Every
rank takes part in every exchange, forward and backward, in layer order.

Data-parallel groups are orthogonal: ranks [g * P, (g + 1) * P) form context-parallel group g and read the
same sequence. `context_parallel_loss` returns this rank's share of the mean cross-entropy (the shares sum to
the loss), so summing gradients over a group gives the whole sequence's gradient; under data-parallel averaging
over all ranks the caller multiplies the share by P. Statistics gathered in the forward (scan-order sums, mask
activations) cover each rank's piece; summed over all ranks they cover every sequence of the step.

Its collectives (tensors on the compute device, on the context-parallel groups) live in training/distributed.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from adaptive_mamba.chunked import Boundary, ScanFrom, piece_loss_sum, shifted_targets, target_count
from adaptive_mamba.model import AdaptiveMambaForCausalLM, MambaMixer
from adaptive_mamba.training.distributed import all_gather_tensor, group_rank_and_size


def piece_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous near-equal pieces [(start, stop)] of a sequence of `length` tokens, the longer ones first."""
    base, extra = divmod(length, parts)
    bounds, start = [], 0
    for r in range(parts):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class _FromPrevious(torch.autograd.Function):
    """Rank r receives rank r - 1's tensor (zeros on rank 0); the gradient goes back to the sender."""

    @staticmethod
    def forward(ctx, t, group):  # type: ignore[override]
        rank, size = group_rank_and_size(group)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        gathered = all_gather_tensor(t, group)
        return gathered[rank - 1].clone() if rank > 0 else torch.zeros_like(t)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        gathered = all_gather_tensor(grad, ctx.group)
        return (gathered[ctx.rank + 1].clone() if ctx.rank + 1 < ctx.size else torch.zeros_like(grad)), None


class _StatePrefix(torch.autograd.Function):
    """h0_r = sum_{j<r} (prod_{j<k<r} P_k) H_j from every rank's (H_j, P_j); backward by the adjoint prefix."""

    @staticmethod
    def forward(ctx, last_from_zero, decay, group):  # type: ignore[override]
        rank, size = group_rank_and_size(group)
        pairs = all_gather_tensor(torch.stack([last_from_zero, decay]), group)          # (size, 2, B, d, N)
        h0 = torch.zeros_like(last_from_zero)
        for j in range(rank):
            h0 = pairs[j, 1] * h0 + pairs[j, 0]
        ctx.group, ctx.rank, ctx.size = group, rank, size
        ctx.save_for_backward(pairs[:, 1], h0)
        return h0

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        decays, h0 = ctx.saved_tensors
        grads = all_gather_tensor(grad, ctx.group)                                     # dL/dh0_q of every rank q
        adjoint = torch.zeros_like(grad)                                         # lambda_{r+1}: total dL/dh0_{r+1}
        for q in range(ctx.size - 1, ctx.rank, -1):
            adjoint = grads[q] + decays[q] * adjoint
        return adjoint, adjoint * h0, None


@dataclass
class ExchangedState(Boundary):
    """A piece's incoming conv tail and SSM state, received from the earlier ranks of `group`."""

    group: Any

    def conv_tail(self, mixer: MambaMixer, x: Tensor) -> Tensor:
        pad = mixer.d_conv - 1
        if x.shape[-1] < pad:
            raise ValueError(f"a context-parallel piece of {x.shape[-1]} tokens is shorter than the conv tail "
                             f"(d_conv - 1 = {pad}): use longer sequences or fewer context-parallel ranks")
        return _FromPrevious.apply(x[..., x.shape[-1] - pad:].float().contiguous(), self.group)

    def scan(self, scan_from: ScanFrom, decay: Callable[[], Tensor]) -> Tensor:
        _, last_from_zero = scan_from(None, False)
        h0 = _StatePrefix.apply(last_from_zero.contiguous(), decay().contiguous(), self.group)
        return scan_from(h0, True)[0]


def context_parallel_loss(model: AdaptiveMambaForCausalLM, input_ids: Tensor, labels: Tensor, group: Any) -> Tensor:
    """This rank's share of the mean next-token cross-entropy of the whole sequence: its piece's summed
    cross-entropy over the whole sequence's target count. Every rank of `group` passes the same full
    (batch, length) `input_ids` and `labels` and calls this together (forward and backward are collective)."""
    rank, size = group_rank_and_size(group)
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and labels must both be (batch, length); got {tuple(input_ids.shape)} and "
                         f"{tuple(labels.shape)}")
    start, stop = piece_bounds(input_ids.shape[1], size)[rank]
    boundaries = [ExchangedState(group) for _ in model.blocks]
    targets = shifted_targets(labels)[:, start:stop]
    return piece_loss_sum(model, input_ids[:, start:stop], targets, boundaries) / target_count(labels)


__all__ = ["ExchangedState", "context_parallel_loss", "piece_bounds"]
