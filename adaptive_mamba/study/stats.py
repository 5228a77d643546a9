"""Paired statistics over seeds: bootstrap confidence intervals, sign-flip p-values, Holm's correction.

Seeds are paired across arms (same initialisation and data order), so an effect is computed per seed
first (a contrast of arms' values on that seed) and the uncertainty comes from resampling seeds.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """Mean of per-seed values with a paired-bootstrap CI and a two-sided sign-flip p-value."""

    mean: float
    low: float
    high: float
    p: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "p": self.p, "n": self.n}


def bootstrap_ci(values: Sequence[float], n_boot: int = 10000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling the (paired) per-seed values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def sign_flip_p(values: Sequence[float], n_mc: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of "mean = 0" by flipping the signs of the per-seed differences: exact over all 2^n
    flips up to n = 16, Monte Carlo beyond. With n seeds the smallest possible p is 2 / 2^n."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan
    observed = abs(x.mean())
    if x.size <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=x.size)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_mc, x.size))
    flipped = np.abs((signs * x).mean(axis=1))
    return float(np.mean(flipped >= observed - 1e-12 * max(1.0, observed)))


def estimate(values: Sequence[float]) -> Estimate:
    low, high = bootstrap_ci(values)
    return Estimate(float(np.mean(values)) if len(values) else math.nan, low, high, sign_flip_p(values), len(values))


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (NaNs are left out and stay NaN)."""
    valid = sorted(((p, k) for k, p in pvalues.items() if not math.isnan(p)))
    m = len(valid)
    adjusted: dict[str, float] = {k: math.nan for k in pvalues}
    running = 0.0
    for i, (p, key) in enumerate(valid):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[key] = running
    return adjusted


def contrast(values: Mapping[str, Mapping[int, float]], weights: Mapping[str, float]) -> dict[int, float]:
    """Per-seed value of sum_arm weight * value[arm][seed], over the seeds every weighted arm has."""
    seeds: Optional[set[int]] = None
    for arm in weights:
        have = {s for s, v in values.get(arm, {}).items() if v is not None and not math.isnan(v)}
        seeds = have if seeds is None else seeds & have
    return {s: sum(w * values[arm][s] for arm, w in weights.items()) for s in sorted(seeds or ())}
