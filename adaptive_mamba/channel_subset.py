"""The parts of a Mamba mixer restricted to a subset of its d_inner channels: the channel-sparse training forward.

A channel whose channel-mask value is exactly 0 in a training forward contributes nothing: its scan input and its
gated output are multiplied by 0, so it reaches neither x_proj nor out_proj, and every parameter of it (in_proj x/z
rows, conv filter, dt_proj row, A_log/D rows, x_proj/out_proj columns) gets a zero gradient. `ChannelSubset` runs
each part of the mixer over the other channels only, so the projections and the scan shrink (the conv too, through
`ops.causal_conv1d_silu(x, conv, kept)`). Weights are gathered with `index_select`, whose backward scatters the
gradients into the full parameters (zero in the rows of dropped channels), so the loss and every gradient equal
those of the dense masked forward (tests/test_masks.py).

A projection wrapped by an adapter (peft) is still called as a module, at full width, and its output is gathered
(or its input placed into zeros at full width): adapters take effect, and only the plain projections shrink.
`kept=None` is the dense forward: each part is the module itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ChannelSubset:
    """The channels `kept` (sorted indices, at least one) of `mixer`, or all of them (`kept` None). Activations of
    the subset are (B, L, k) (or (B, k, L) views) with channel j the mixer's channel kept[j]."""

    def __init__(self, mixer: nn.Module, kept: Optional[Tensor]) -> None:
        self.mixer, self.kept = mixer, kept
        self.xz_rows = None if kept is None else torch.cat([kept, kept + mixer.d_inner])   # in_proj's x and z halves

    def _outputs(self, module: nn.Module, x: Tensor, rows: Optional[Tensor]) -> Tensor:
        """A projection whose outputs are d_inner channels (in_proj, dt_proj), for the `rows` outputs only (None:
        every channel, the module itself)."""
        if rows is None:
            return module(x)
        if type(module) is nn.Linear:
            bias = None if module.bias is None else module.bias.index_select(0, rows)
            return F.linear(x, module.weight.index_select(0, rows), bias)
        return module(x).index_select(-1, rows)

    def _inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """A projection whose inputs are d_inner channels (x_proj, out_proj), given the kept inputs (..., k)."""
        if self.kept is None:
            return module(x)
        if type(module) is nn.Linear:
            return F.linear(x, module.weight.index_select(1, self.kept), module.bias)
        return module(self.full(x, -1))

    def full(self, x: Tensor, dim: int) -> Tensor:
        """x (the kept channels along `dim`) placed into zeros of the mixer's full width."""
        shape = list(x.shape)
        shape[dim] = self.mixer.d_inner
        return x.new_zeros(shape).index_copy(dim, self.kept, x)

    def in_proj(self, hidden: Tensor) -> Tensor:
        """(B, L, 2k): the x and z halves of the kept channels."""
        return self._outputs(self.mixer.in_proj, hidden, self.xz_rows)

    def scan_input(self, u: Tensor) -> Tensor:
        """The mixer's `scan_input` observation point on u (B, k, L): hooks see the full width, dropped channels 0
        (the value the dense masked forward gives them), so statistics do not depend on the path."""
        point = self.mixer.scan_input
        if self.kept is None:
            return point(u)
        if type(point) is nn.Identity and not (point._forward_hooks or point._forward_pre_hooks):
            return u
        return point(self.full(u, 1)).index_select(1, self.kept)

    def x_proj(self, u: Tensor) -> Tensor:
        return self._inputs(self.mixer.x_proj, u)

    def dt_proj(self, dt: Tensor) -> Tensor:
        return self._outputs(self.mixer.dt_proj, dt, self.kept)

    def out_proj(self, y: Tensor) -> Tensor:
        return self._inputs(self.mixer.out_proj, y)

    def per_channel(self, param: Tensor) -> Tensor:
        """The kept rows of a per-channel tensor (A_log, D, the channel mask values)."""
        return param if self.kept is None else param.index_select(0, self.kept)


__all__ = ["ChannelSubset"]
