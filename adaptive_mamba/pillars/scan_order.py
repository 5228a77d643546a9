"""Pillar 1: variable-aware scan order. Reorder the d_inner channels of each layer so that correlated channels are
neighbours; the reorder is an exact reparametrisation (the model's outputs do not change).

Collect statistics / decide / apply, so that a distributed caller can all-reduce, broadcast and checkpoint:

    c = ScanStatsCollector(model)       per layer float64 running sum of u, sum of u u^T and token count, from a
                                        forward hook on mixer.scan_input (no hook, no cost, when disabled); each
                                        forward's sums are rounded to a 2^-24 grid so that accumulation is exact
                                        (the same statistics whatever the split over ranks and micro-batches)
    c.enable(); c.disable(); c.reset()
    c.state_tensors()                   the statistics as a flat list of tensors: all-reduce them (SUM) in place
    decide_scan_order(c or stats)       -> ScanOrderDecision: per layer permutation + path costs (identity, greedy
                                        nearest neighbour, after 2-opt); to_dict()/from_dict() are JSON-safe
    reparametrization_plan(model, d)    -> [PermuteOp(name, dim, index, block_size)]: every parameter to permute
                                        (base weights, mask logits, LoRA/IA3 weights); PermuteOp.apply(tensor) also
                                        permutes fp32 master copies and Adam moments the same way
    apply_scan_order(model, d, ...)     applies the plan in place (and to a torch optimizer's state), records the
                                        cumulative order in model.config.extra["scan_order"] (saved with the model)
    current_scan_order(model)           per layer: original channel index at each current position

Permutation convention: perm[k] = the current channel that moves to position k (new = old.index_select(perm)).
Statistics are in the current channel order; after applying a decision reset the collector (apply_scan_order does
it when given the collector). They come from training forwards only (a module in eval mode records nothing), and
the recomputation of a checkpointed block (which runs inside backward) is skipped, so each token counts once.

Exactness under masks: a permutation never averages a mask logit. Channel masks (one logit per channel) move with
their channel. Structured block masks hold one logit per block of `block_size` channels: a layer whose block logits
are all equal (masks not yet learned) may be reordered freely (each new block copies the common value), any other
layer only by moving whole blocks and permuting channels within a block (`reorder_block_sizes` says which, and
`decide_scan_order(..., block_sizes)` then searches the order of blocks and the order inside each block). The plan
checks this on the values and refuses a permutation that would mix different logits into one block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from adaptive_mamba.config import Settings, at_least, setting
from adaptive_mamba.pillars.common import D_INNER_SIDE, PROJECTIONS, base_layer
from adaptive_mamba.pillars.path_search import (LayerStats, best_path, canonical_cost, correlation, cost_matrix,
                                                nearest_neighbour_path, path_cost, search_canonical, two_opt)

if TYPE_CHECKING:
    from adaptive_mamba.model import AdaptiveMambaForCausalLM


@dataclass
class ScanOrderConfig(Settings):
    """Pillar 1 settings (the `scan_order` section of a training config)."""

    enabled: bool = setting(True, "reorder d_inner channels along a short path of the channel correlation graph")
    every: int = setting(50, "optimizer steps between scan-order refreshes (0: never)", check=at_least(0))
    token_stride: int = setting(8, "the statistics read every token_stride-th token (the hook costs ~1/n of its "
                                "stride-1 cost; any value keeps the refresh exact)", check=at_least(1))


class ScanStatsCollector:
    """Streaming float64 statistics of the scan input u (B, d_inner, L) of every layer."""

    def __init__(self, model: "AdaptiveMambaForCausalLM", token_stride: int = 1) -> None:
        if token_stride < 1:
            raise ValueError(f"token_stride must be >= 1, got {token_stride}")
        self.mixers = [block.mixer for block in model.blocks]
        self.token_stride = token_stride
        self.stats: list[LayerStats] = []
        for mixer in self.mixers:
            dev, d = mixer.A_log.device, mixer.d_inner
            self.stats.append((torch.zeros(d, dtype=torch.float64, device=dev),
                               torch.zeros(d, d, dtype=torch.float64, device=dev),
                               torch.zeros((), dtype=torch.float64, device=dev)))
        self._handles: list[Any] = []

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self) -> None:
        if not self._handles:
            self._handles = [m.scan_input.register_forward_hook(self._hook(i)) for i, m in enumerate(self.mixers)]

    def disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        for tensors in self.stats:
            for t in tensors:
                t.zero_()

    def state_tensors(self) -> list[Tensor]:
        """[sum_0, outer_0, count_0, sum_1, ...]: the tensors to all-reduce (SUM) across ranks, in place."""
        return [t for tensors in self.stats for t in tensors]

    def _hook(self, layer: int):
        def hook(module: nn.Module, inputs: Any, u: Tensor) -> None:
            # training forwards only (not validation / evaluation), and not the recomputation of a checkpointed
            # block, which runs inside the backward pass (a graph task is executing): each token counts once
            if not module.training or torch._C._current_graph_task_id() != -1:
                return
            s, outer, count = self.stats[layer]
            with torch.no_grad():
                x = u.detach().transpose(1, 2).reshape(-1, u.shape[1])[::self.token_stride].to(torch.float64)
                s.add_(_on_grid(x.sum(0)))
                outer.add_(_on_grid(x.T @ x))
                count.add_(x.shape[0])
        return hook


STATS_GRID_BITS = 24     # statistics are multiples of 2^-24: float64 sums of them are exact below 2^29


def _on_grid(t: Tensor) -> Tensor:
    """`t` (a fresh tensor, overwritten) rounded in place to a multiple of 2^-STATS_GRID_BITS. Sums of such values are exact in float64 (while below
    2^(53 - STATS_GRID_BITS)), so they do not depend on the order of addition: one process accumulating two
    micro-batches per step and two ranks accumulating one each, then all-reduced, hold bit-identical statistics,
    and the scan-order decision (a discrete choice that a 1-ulp difference can flip at a near-tie) is the same
    at every ZeRO stage and world size."""
    scale = float(2 ** STATS_GRID_BITS)          # a power of two: scaling is exact
    return t.mul_(scale).round_().div_(scale)


@dataclass
class ScanOrderDecision:
    """Per layer: the permutation to apply (identity when no improvement was found) and the path costs."""

    perms: list[list[int]]
    cost_identity: list[float]      # the current order
    cost_greedy: list[float]        # best nearest-neighbour path, before 2-opt
    cost_after: list[float]         # the chosen order (after 2-opt, or the identity when kept)
    step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"perms": self.perms, "cost_identity": self.cost_identity, "cost_greedy": self.cost_greedy,
                "cost_after": self.cost_after, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScanOrderDecision":
        return cls(perms=[list(map(int, p)) for p in data["perms"]], cost_identity=list(data["cost_identity"]),
                   cost_greedy=list(data["cost_greedy"]), cost_after=list(data["cost_after"]),
                   step=int(data.get("step", 0)))

    def summary(self) -> str:
        return "\n".join(f"layer {i}: path cost identity {ci:.2f} -> greedy {cg:.2f} -> 2-opt {ca:.2f} "
                         f"({100 * (1 - ca / ci) if ci else 0.0:.1f}% lower)"
                         for i, (ci, cg, ca) in enumerate(zip(self.cost_identity, self.cost_greedy, self.cost_after)))


def blockwise_path(cost: np.ndarray, block_size: int, n_starts: int = 8, max_passes: int = 50) -> np.ndarray:
    """A path that keeps each run of `block_size` consecutive channels together: the blocks ordered by a path over
    the mean inter-block cost, the channels of each block by a path over their own costs. block_size 1: best_path."""
    if block_size == 1:
        return best_path(cost, n_starts, max_passes)[0]
    d = cost.shape[0]
    blocks = np.arange(d).reshape(d // block_size, block_size)
    inside = [blk[best_path(cost[np.ix_(blk, blk)], n_starts, max_passes)[0]] for blk in blocks]
    between = cost.reshape(len(blocks), block_size, len(blocks), block_size).mean(axis=(1, 3))
    return np.concatenate([inside[k] for k in best_path(between, n_starts, max_passes)[0]])


def decide_layer(stats: LayerStats, block_size: int = 1, n_starts: int = 8, max_passes: int = 50,
                 min_improvement: float = 0.0) -> tuple[list[int], float, float, float]:
    """One layer's decision (see decide_scan_order): (permutation, identity cost, greedy cost, cost after)."""
    cost = canonical_cost(cost_matrix(stats))     # exact path sums: no ties made by rounding noise
    d = cost.shape[0]
    identity_cost = path_cost(cost, np.arange(d))
    if block_size == 1:                            # `cost` is canonical already: search it as it is
        greedy, order = search_canonical(cost, n_starts, max_passes)
        greedy_cost, after_cost = path_cost(cost, greedy), path_cost(cost, order)
    else:
        order = blockwise_path(cost, block_size, n_starts, max_passes)
        greedy_cost = path_cost(cost, blockwise_path(cost, block_size, n_starts, 0))
        after_cost = path_cost(cost, order)
    if after_cost >= identity_cost * (1.0 - min_improvement):
        order, after_cost = np.arange(d), identity_cost
    return order.tolist(), identity_cost, greedy_cost, after_cost


def decide_scan_order(source: ScanStatsCollector | Sequence[LayerStats], n_starts: int = 8, max_passes: int = 50,
                      min_improvement: float = 0.0, step: int = 0, block_sizes: Optional[Sequence[int]] = None,
                      rank: int = 0, world_size: int = 1,
                      exchange: Optional[Callable[[Any], list[Any]]] = None) -> ScanOrderDecision:
    """Decide each layer's order from its statistics (cost 1 - |rho|). A layer keeps its current order unless the
    new path is cheaper by more than `min_improvement` (a fraction of the identity cost). `block_sizes` (per layer,
    default 1 = free; see reorder_block_sizes) keeps runs of that many channels together. cost_greedy is the
    cost before 2-opt. Deterministic.

    Spread over ranks (every rank holding the same statistics): rank `rank` of `world_size` decides layers rank,
    rank + world_size, ...; `exchange` (an all-gather of objects: every rank's object, in rank order) then gives
    each rank every layer's result, so every rank returns the whole decision, the one a single process decides
    (each layer's search depends only on that layer's statistics)."""
    stats = source.stats if isinstance(source, ScanStatsCollector) else list(source)
    block_sizes = [1] * len(stats) if block_sizes is None else list(block_sizes)
    if len(block_sizes) != len(stats):
        raise ValueError(f"block_sizes has {len(block_sizes)} entries for {len(stats)} layers")
    for layer_stats, block_size in zip(stats, block_sizes):     # checked on every rank, before any exchange
        d = layer_stats[0].shape[0]
        if block_size < 1 or d % block_size:
            raise ValueError(f"block size {block_size} does not divide d_inner {d}: choose a divisor of {d}")
    if world_size > 1 and exchange is None:
        raise ValueError(f"deciding on {world_size} ranks needs `exchange` (an all-gather of objects across ranks)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range({world_size})")
    mine = {i: decide_layer(stats[i], block_sizes[i], n_starts, max_passes, min_improvement)
            for i in range(rank, len(stats), world_size)}
    rows = {i: row for part in exchange(mine) for i, row in part.items()} if world_size > 1 else mine
    perms, c_id, c_greedy, c_after = (list(column) for column in zip(*(rows[i] for i in range(len(stats)))))
    return ScanOrderDecision(perms, c_id, c_greedy, c_after, step)


# ------------------------------------------------------------------------------------------------- apply
@dataclass
class PermuteOp:
    """Permute parameter `name` along `dim`: new = old.index_select(dim, index). With block_size > 1 the parameter
    holds one value per block of channels (structured mask logits): `index` maps each new channel to its old
    block, and each new block copies the value of the old block of its first channel. The plan only builds such an
    op when that is exact (whole blocks move, or every block involved holds the same value): never an average."""

    name: str
    dim: int
    index: Tensor
    block_size: int = 1

    def apply(self, tensor: Tensor) -> Tensor:
        index = self.index if self.block_size == 1 else self.index[::self.block_size]
        return tensor.index_select(self.dim, index.to(tensor.device))

    def is_exact_for(self, tensor: Tensor) -> bool:
        """Whether every new block gathers channels whose old blocks hold equal values (so the copy is exact)."""
        values = tensor.index_select(self.dim, self.index.to(tensor.device)).movedim(self.dim, 0)
        values = values.unflatten(0, (-1, self.block_size))
        return bool((values == values[:, :1]).all())


@torch.no_grad()
def permute_parameter(param: Tensor, fn: Callable[[Tensor], Tensor], optimizer_state: Mapping[str, Any]) -> None:
    """param <- fn(param) in place, and each per-element tensor of its torch optimizer state (Adam's moments, not
    its "step") the same way: how a reparametrisation is applied without ZeRO (apply_scan_order, and the engine's
    permute_engine_params when DeepSpeed keeps no fp32 master copy)."""
    param.copy_(fn(param))
    for value in optimizer_state.values():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape:
            value.copy_(fn(value))


def _projection_ops(prefix: str, rel: str, param: Tensor, module: nn.Module, side: str,
                    index: Tensor) -> list[PermuteOp]:
    """Ops for one parameter `rel` of a projection (e.g. 'base_layer.lora_A.x.weight'); `index` permutes the
    projection's d_inner side."""
    parts = [p for p in rel.split(".") if p != "base_layer"]
    name = f"{prefix}.{rel}"
    dim_of_side = 0 if side == "out" else 1
    if parts == ["weight"]:
        return [PermuteOp(name, dim_of_side, index)]
    if parts == ["bias"] or parts[0] == "lora_B":
        return [PermuteOp(name, 0, index)] if side == "out" else []
    if parts == ["mask_logits"]:
        layer = base_layer(module)
        if layer.kind == "unstructured":
            return [PermuteOp(name, dim_of_side, index)]
        if layer.side != side:
            return []
        op = PermuteOp(name, 0, index // layer.block_size, layer.block_size)
        if not op.is_exact_for(layer.mask_logits.detach()):
            raise ValueError(f"{name}: the permutation splits blocks of a structured mask whose logits differ, which "
                             "would change the mask; decide with block_sizes=reorder_block_sizes(model)")
        return [op]
    if parts[0] == "lora_A":
        return [PermuteOp(name, 1, index)] if side == "in" else []
    if parts[0] == "ia3_l":   # (out, 1) scales outputs, (1, in) scales inputs
        scales_out = param.shape[1] == 1 and param.shape[0] > 1
        if scales_out == (side == "out"):
            return [PermuteOp(name, 0 if scales_out else 1, index)]
        return []
    raise ValueError(f"parameter {name} is of a kind the scan-order reparametrisation does not know; permuting the "
                     "channels would change the model. Remove that adapter (or compile_masks) before reordering")


def reparametrization_plan(model: "AdaptiveMambaForCausalLM", decision: ScanOrderDecision) -> list[PermuteOp]:
    """Every parameter to permute for `decision` and how, named as in model.named_parameters(). Layers whose
    permutation is the identity are skipped."""
    if len(decision.perms) != len(model.blocks):
        raise ValueError(f"decision has {len(decision.perms)} layers, the model {len(model.blocks)}")
    plan: list[PermuteOp] = []
    for i, block in enumerate(model.blocks):
        mixer = block.mixer
        perm = torch.as_tensor(decision.perms[i], dtype=torch.long)
        if sorted(decision.perms[i]) != list(range(mixer.d_inner)):
            raise ValueError(f"layer {i}: not a permutation of range({mixer.d_inner})")
        if torch.equal(perm, torch.arange(mixer.d_inner)):
            continue
        prefix = f"blocks.{i}.mixer"
        for rel, param in mixer.named_parameters():
            head = rel.split(".")[0]
            if head in ("A_log", "D") or rel == "channel_mask.mask_logits":    # one value per channel
                plan.append(PermuteOp(f"{prefix}.{rel}", 0, perm))
            elif head == "conv1d":
                if rel not in ("conv1d.weight", "conv1d.bias"):
                    raise ValueError(f"{prefix}.{rel}: adapters on conv1d are not supported by the scan reorder")
                plan.append(PermuteOp(f"{prefix}.{rel}", 0, perm))
            elif head in PROJECTIONS:
                if type(base_layer(getattr(mixer, head))).__name__ == "CompactLinear":
                    raise ValueError(f"{prefix}.{head} is a compiled mask (CompactLinear): reorder before compile_masks")
                index = torch.cat([perm, perm + mixer.d_inner]) if head == "in_proj" else perm  # x and z halves
                plan += _projection_ops(f"{prefix}.{head}", rel[len(head) + 1:], param, getattr(mixer, head),
                                        D_INNER_SIDE[head], index)
            else:
                raise ValueError(f"unknown mixer parameter {prefix}.{rel}: cannot reorder channels safely")
    return plan


def reorder_block_sizes(model: "AdaptiveMambaForCausalLM") -> list[int]:
    """Per layer, the runs of channels a refresh must keep together to stay exact: the block size of a structured
    mask on the d_inner side whose logits are not all equal, else 1 (free)."""
    sizes = []
    for block in model.blocks:
        size = 1
        for proj in PROJECTIONS:
            layer = base_layer(getattr(block.mixer, proj))
            logits = getattr(layer, "mask_logits", None)
            if (getattr(layer, "kind", None) == "structured" and layer.side == D_INNER_SIDE[proj]
                    and logits is not None and logits.numel() and bool((logits != logits.reshape(-1)[0]).any())):
                size = math.lcm(size, layer.block_size)
        sizes.append(size)
    return sizes


def current_scan_order(model: "AdaptiveMambaForCausalLM") -> list[list[int]]:
    """Per layer, the original channel index now at each position (identity if never reordered)."""
    saved = model.config.extra.get("scan_order")
    return [list(p) for p in saved] if saved else [list(range(b.mixer.d_inner)) for b in model.blocks]


@torch.no_grad()
def apply_scan_order(model: "AdaptiveMambaForCausalLM", decision: ScanOrderDecision,
                     optimizer: Optional[torch.optim.Optimizer] = None,
                     collector: Optional[ScanStatsCollector] = None) -> list[PermuteOp]:
    """Apply the decision in place (single process): permute every parameter of the plan, the matching state of
    `optimizer` (Adam moments...), reset `collector`, and update the cumulative order in model.config.extra."""
    plan = reparametrization_plan(model, decision)
    params = dict(model.named_parameters())
    for op in plan:
        p = params[op.name]
        permute_parameter(p, op.apply, {} if optimizer is None else optimizer.state.get(p, {}))
    order = current_scan_order(model)
    model.config.extra["scan_order"] = [[o[k] for k in perm] for o, perm in zip(order, decision.perms)]
    if collector is not None:
        collector.reset()
    return plan


__all__ = ["LayerStats", "PermuteOp", "blockwise_path", "ScanOrderDecision", "ScanStatsCollector", "apply_scan_order",
           "best_path", "correlation", "current_scan_order", "decide_layer", "decide_scan_order",
           "nearest_neighbour_path", "path_cost", "permute_parameter", "reorder_block_sizes", "reparametrization_plan",
           "two_opt"]
