"""Pillar 1's vectorised path search against plain loop implementations of the same greedy and 2-opt rules."""
from __future__ import annotations

import numpy as np

from adaptive_mamba.pillars.path_search import (best_path, canonical_cost, nearest_neighbour_paths, path_cost,
                                                two_opt)


def loop_nearest_neighbour(cost: np.ndarray, start: int) -> list[int]:
    order, left = [start], set(range(len(cost))) - {start}
    while left:
        order.append(min(left, key=lambda j: (cost[order[-1], j], j)))
        left.remove(order[-1])
    return order


def correlated_cost(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.repeat(rng.standard_normal((500, d // 8)), 8, axis=1) + rng.standard_normal((500, d))
    return 1 - np.abs(np.corrcoef(x[:, rng.permutation(d)].T))


def test_nearest_neighbour_paths_equal_the_one_start_loop() -> None:
    cost = correlated_cost(40, 0)
    cost[3, 7] = cost[7, 3] = cost[3, 9] = cost[9, 3] = 0.0           # a tie: the lowest index wins
    starts = [0, 3, 17, 39]
    got = nearest_neighbour_paths(cost, starts)
    assert [list(row) for row in got] == [loop_nearest_neighbour(cost, s) for s in starts]


def test_neighbour_list_two_opt_is_a_permutation_no_worse_than_its_start() -> None:
    """Above the exhaustive size only neighbour-list moves run: still a permutation, never costlier than greedy,
    and within 1% of the exhaustive 2-opt from the same start."""
    cost = correlated_cost(96, 1)
    greedy = nearest_neighbour_paths(cost, [0])[0]
    fast = two_opt(cost, greedy, exhaustive_up_to=0)
    full = two_opt(cost, greedy)
    assert sorted(fast.tolist()) == list(range(96)) and sorted(full.tolist()) == list(range(96))
    assert path_cost(cost, fast) <= path_cost(cost, greedy) + 1e-12
    assert path_cost(cost, full) <= path_cost(cost, fast) * 1.01


def test_best_path_finds_the_optimal_line() -> None:
    """Points on a line, shuffled: the optimal open path visits them in order, cost = span of the line."""
    rng = np.random.default_rng(2)
    pos = np.sort(rng.random(60))
    shuffle = rng.permutation(60)
    p = pos[shuffle]
    cost = np.abs(p[:, None] - p[None, :])
    order, _, after = best_path(cost)
    assert after == np.float64(path_cost(cost, order))
    assert abs(after - (pos[-1] - pos[0])) < 1e-12


def test_canonical_cost_makes_path_costs_exact_and_rounding_noise_irrelevant() -> None:
    """The canonical cost is exactly symmetric with exact path sums (a path and its reverse tie exactly, so the tie
    goes to the lowest index, not to rounding), and best_path ignores 1-ulp-level noise in its input (what one
    process vs two ranks, or ZeRO-3 vs ZeRO-0, produce in the statistics)."""
    cost = correlated_cost(64, 3)
    noisy = cost * (1 + 1e-15 * np.random.default_rng(0).standard_normal(cost.shape))    # not even symmetric
    canon = canonical_cost(noisy)
    assert np.array_equal(canon, canon.T) and np.array_equal(canonical_cost(canon), canon)
    np.testing.assert_allclose(canon, cost, atol=1e-9)
    order = np.random.default_rng(1).permutation(64)
    assert path_cost(canon, order) == path_cost(canon, order[::-1])
    assert np.array_equal(best_path(noisy)[0], best_path(cost)[0])
