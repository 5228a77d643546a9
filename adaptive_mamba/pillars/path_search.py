"""Pillar 1's path search: an order of the d_inner channels that puts correlated channels next to each other.

Cost between channels: 1 - |rho| (rho: Pearson correlation from streaming statistics). The path is open; it is
handled as a tour through a virtual node at zero cost from every channel, so reversing a prefix or suffix (one
changed edge) is the same move as reversing an inner segment (two changed edges).

Vectorised with numpy: nearest-neighbour paths from several starts advance together, and 2-opt applies, per
pass, every improving non-overlapping segment reversal among those that join a channel to one of its nearest
neighbours; at moderate width, passes over all pairs then certify a true 2-opt local optimum.
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

LayerStats = tuple[Tensor, Tensor, Tensor]   # (sum (d,), sum of outer products (d, d), count ()) in float64


def _correlation(stats: LayerStats) -> Tensor:
    """Pearson correlation (float64) in one d x d buffer, every step in place (the matrices are 18 MiB at d 1536)."""
    s, outer, count = (t.detach().cpu().double() for t in stats)
    n = float(count)
    if n < 2:
        raise ValueError(f"need statistics of at least 2 tokens to estimate correlations, got {n:.0f}: enable the "
                         "collector and run forward passes first")
    mean = s / n
    rho = (outer / n).addr_(mean, mean, alpha=-1.0)                  # covariance
    std = rho.diagonal().clamp(min=0.0).sqrt()
    live = std > 1e-12 * max(float(std.max()), 1e-300)
    inv = torch.where(live, 1.0 / torch.where(live, std, 1.0), 0.0)
    rho.mul_(inv[:, None]).mul_(inv[None, :]).clamp_(-1.0, 1.0)
    return rho.fill_diagonal_(1.0)


def correlation(stats: LayerStats) -> np.ndarray:
    """Pearson correlation matrix from (sum, sum of outer products, count); channels with zero variance get
    correlation 0 with every other channel."""
    return _correlation(stats).numpy()


def cost_matrix(stats: LayerStats) -> np.ndarray:
    """The path search's cost 1 - |rho| between channels (float64), computed in place."""
    return _correlation(stats).abs_().neg_().add_(1.0).numpy()


COST_GRID_BITS = 32      # path costs are multiples of 2^-32: sums of up to 2^21 edges of cost <= 1 are exact


def canonical_cost(cost: np.ndarray) -> np.ndarray:
    """`cost` made exactly symmetric and rounded to a multiple of 2^-COST_GRID_BITS, so that every path cost is an
    exact sum (the same in any order of addition). A path and its reverse then cost exactly the same, and such ties
    go to the lowest index instead of to rounding noise: the decision does not hinge on 1-ulp differences in the
    statistics (one process vs several ranks, ZeRO stages). Idempotent."""
    canon = cost + cost.T
    canon *= float(2 ** (COST_GRID_BITS - 1))     # (cost + cost.T) / 2 on the grid: powers of two scale exactly
    np.round(canon, out=canon)
    canon /= float(2 ** COST_GRID_BITS)
    return canon


def path_cost(cost: np.ndarray, order: Sequence[int]) -> float:
    """Sum of cost[order[k], order[k+1]] over consecutive positions (an open path)."""
    order = np.asarray(order)
    return float(cost[order[:-1], order[1:]].sum())


def nearest_neighbour_paths(cost: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """Greedy paths, one per start, built together: from each start, always step to the cheapest unvisited
    channel (ties: lowest index). O(d^2) per start. Returns (len(starts), d)."""
    d, k = cost.shape[0], len(starts)
    rows = np.arange(k)
    orders = np.empty((k, d), dtype=np.int64)
    orders[:, 0] = starts
    visited = np.zeros((k, d))
    visited[rows, orders[:, 0]] = np.inf
    for step in range(1, d):
        orders[:, step] = np.argmin(cost[orders[:, step - 1]] + visited, axis=1)
        visited[rows, orders[:, step]] = np.inf
    return orders


def nearest_neighbour_path(cost: np.ndarray, start: int) -> np.ndarray:
    """The greedy path from one start (see nearest_neighbour_paths)."""
    return nearest_neighbour_paths(cost, [start])[0]


def _disjoint(moves: np.ndarray, gains: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Greedily (largest gain first) the reversals [i, j] whose changed edges and segments do not interact: the
    closed position ranges [i - 1, j + 1] of two accepted moves share at most an endpoint, i.e. the open ranges
    (i - 1, j + 1) are disjoint (checked against the sorted accepted ranges by bisection)."""
    starts: list[int] = []      # lower ends of the accepted ranges, sorted; ends[k] is the upper end of starts[k]
    ends: list[int] = []
    accepted = []
    for m in np.argsort(gains, kind="stable").tolist():
        i, j = int(moves[m, 0]), int(moves[m, 1])
        lo, hi = i - 1, j + 1
        k = bisect.bisect_left(starts, lo)
        if (k > 0 and ends[k - 1] > lo) or (k < len(starts) and starts[k] < hi):
            continue
        starts.insert(k, lo)
        ends.insert(k, hi)
        accepted.append((i, j))
    return accepted


def _improve(full: np.ndarray, tour: np.ndarray, moves: np.ndarray, eps: float) -> bool:
    """Apply every improving, mutually independent reversal among `moves` ((m, 2) positions i < j) to `tour`."""
    n = len(tour)
    if not len(moves):
        return False
    i, j = moves[:, 0], moves[:, 1]
    a, b, c, e = tour[i - 1], tour[i], tour[j], tour[(j + 1) % n]
    delta = full[a, c] + full[b, e] - full[a, b] - full[c, e]
    keep = delta < -eps
    if not keep.any():
        return False
    for lo, hi in _disjoint(moves[keep], delta[keep], n):
        tour[lo:hi + 1] = tour[lo:hi + 1][::-1].copy()
    return True


def _neighbour_moves(tour: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Reversals that create an edge between a channel and one of its nearest neighbours, plus every prefix and
    suffix reversal (they join the virtual node, which has no nearest neighbours)."""
    n = len(tour)
    pos = np.empty(n, dtype=np.int64)
    pos[tour] = np.arange(n)
    p = np.repeat(np.arange(1, n), neighbours.shape[1])         # each real channel's position, per neighbour
    r = pos[neighbours[tour[1:]].ravel()]                       # the neighbour's position
    lo, hi = np.minimum(p, r), np.maximum(p, r)
    # new edge (tour[lo], tour[hi]) as the first changed edge (reverse lo+1..hi) or the second (reverse lo..hi-1)
    first = np.stack([lo + 1, hi], axis=1)
    second = np.stack([lo, hi - 1], axis=1)
    ends = np.arange(1, n)
    prefixes = np.stack([np.ones_like(ends), ends], axis=1)
    suffixes = np.stack([ends, np.full_like(ends, n - 1)], axis=1)
    moves = np.concatenate([first, second, prefixes, suffixes])
    return moves[(moves[:, 0] >= 1) & (moves[:, 0] < moves[:, 1])]


def _all_pair_pass(full32: np.ndarray, full: np.ndarray, tour: np.ndarray, below: Optional[np.ndarray],
                   eps: float) -> bool:
    """One best-improvement pass over every pair i < j (O(d^2), vectorised in float32; the chosen moves are
    re-checked in float64): for each i its best j, then the independent improving ones are applied."""
    n = len(tour)
    edge = full32[tour, np.roll(tour, -1)]
    # row k is i = k + 1: delta[k, j] = c(tour[i-1], tour[j]) + c(tour[i], tour[j+1]) - edge[i-1] - edge[j]
    delta = full32[np.ix_(tour[:-1], tour)]
    delta += full32[np.ix_(tour[1:], np.roll(tour, -1))]
    delta -= edge[:-1, None]
    delta -= edge[None, :]
    delta += below                                                   # +inf where j <= i
    best_j = np.argmin(delta, axis=1)
    rows = np.nonzero(delta[np.arange(n - 1), best_j] < -eps)[0]
    return _improve(full, tour, np.stack([rows + 1, best_j[rows]], axis=1), eps)


def two_opt(cost: np.ndarray, order: np.ndarray, max_passes: int = 50, n_neighbours: int = 8,
            exhaustive_up_to: int = 512, eps: float = 1e-12) -> np.ndarray:
    """Improve an open path by segment reversals until no reversal lowers its cost.

    Passes over the reversals that join each channel to one of its `n_neighbours` nearest neighbours (O(d k) per
    pass) until none improves. Up to `exhaustive_up_to` channels, passes over all pairs (O(d^2) each, at most
    `max_passes`, each followed by neighbour passes) follow until none improves, so the result is a 2-opt local
    optimum; above that, where they would dominate the decision time, the
    neighbour-list optimum is returned (its cost at d = 1536 is within 0.01% of full 2-opt, see BENCHMARKS.md)."""
    d = len(order)
    if d < 3:
        return np.asarray(order).copy()
    full = np.zeros((d + 1, d + 1))
    full[:d, :d] = cost
    full32 = full.astype(np.float32)
    tour = np.concatenate([[d], order]).astype(np.int64)      # virtual node d at position 0
    k = min(n_neighbours, d - 1)
    near = full32[:d, :d].copy()
    np.fill_diagonal(near, np.inf)
    neighbours = np.argpartition(near, k - 1, axis=1)[:, :k]
    neighbours = np.vstack([neighbours, np.zeros((1, k), dtype=neighbours.dtype)])   # virtual: unused row
    below = np.where(np.arange(d + 1)[None, :] <= np.arange(1, d + 1)[:, None], np.float32(np.inf),
                     np.float32(0)) if d <= exhaustive_up_to else None

    def local() -> None:   # terminates: every applied pass strictly lowers the cost
        while _improve(full, tour, _neighbour_moves(tour, neighbours), eps):
            pass

    local()
    for _ in range(max_passes if d <= exhaustive_up_to else 0):
        if not _all_pair_pass(full32, full, tour, below, eps):
            break
        local()
    pos = int(np.nonzero(tour == d)[0][0])
    return np.concatenate([tour[pos + 1:], tour[:pos]]).astype(np.int64)


def search_canonical(canon: np.ndarray, n_starts: int = 8, max_passes: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour paths from n_starts evenly spaced channels on a canonical cost (`canonical_cost`), the
    cheapest improved by 2-opt. Returns (greedy path, improved path)."""
    d = canon.shape[0]
    starts = sorted({int(round(k * d / n_starts)) % d for k in range(max(1, min(n_starts, d)))})
    paths = nearest_neighbour_paths(canon, starts)
    costs = canon[paths[:, :-1], paths[:, 1:]].sum(axis=1)
    greedy = paths[int(np.argmin(costs))]
    return greedy, two_opt(canon, greedy, max_passes)


def best_path(cost: np.ndarray, n_starts: int = 8, max_passes: int = 50) -> tuple[np.ndarray, float, float]:
    """`search_canonical` on the canonical form of `cost` (exactly symmetric, exact sums), so 1-ulp noise in `cost`
    does not change the path. Returns (order, greedy cost, cost after 2-opt) under `cost`."""
    greedy, improved = search_canonical(canonical_cost(cost), n_starts, max_passes)
    return improved, path_cost(cost, greedy), path_cost(cost, improved)


__all__ = ["best_path", "canonical_cost", "correlation", "cost_matrix", "nearest_neighbour_path", "nearest_neighbour_paths",
           "path_cost", "search_canonical", "two_opt"]
