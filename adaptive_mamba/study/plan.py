"""What a study runs: arms (ablation cells, controls, grid points) x regimes x seeds, and in which order.

`configs/study.yaml` defines the modes, cells, controls and grid; `build_plan` turns one mode into a
list of `RunSpec`s. Some runs depend on others' results (the LoRA rank matched to the measured
trainable parameters of the `all` cell; the learning rate picked by a sweep on seed 0): those carry
`needs` (run ids) and unresolved values ("matched", "swept") that `resolve_overrides` fills in once
the needed results exist. `wave` orders the runs so that every run comes after what it needs.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from adaptive_mamba.config import AdaptiveMambaConfig

MODES = ("pilot", "quick_research", "research")
MATCHED = "matched"        # peft.lora_r of a control: the rank whose LoRA parameters match the `all` cell's budget
SWEPT = "swept"            # lr_scale of seeds >= 1: the sweep's best on seed 0


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    regime: str                                   # pretrain | finetune
    arm: str                                      # a cell, a control, or "grid"
    seed: int
    overrides: Mapping[str, Any]                  # dotted TrainConfig keys (may hold MATCHED)
    lr_scale: Any = 1.0                           # a float, or SWEPT
    grid_index: Optional[int] = None
    grid_point: Optional[Mapping[str, Any]] = None   # grid factor -> level (a factor may set several keys)
    needs: tuple[str, ...] = ()                   # run ids whose results resolve this run
    wave: int = 0

    @property
    def run_id(self) -> str:
        parts = [self.regime, self.arm if self.grid_index is None else f"grid{self.grid_index:02d}", f"s{self.seed}"]
        if self.lr_scale != 1.0 and self.lr_scale != SWEPT:
            parts.append(f"lr{self.lr_scale:g}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "regime": self.regime, "arm": self.arm, "seed": self.seed,
                "overrides": dict(self.overrides), "lr_scale": self.lr_scale, "grid_index": self.grid_index,
                "grid_point": None if self.grid_point is None else dict(self.grid_point), "needs": list(self.needs),
                "wave": self.wave}


@dataclass
class StudySpec:
    """configs/study.yaml, read once."""

    train: dict[str, Any]
    modes: dict[str, dict[str, Any]]
    regimes: dict[str, dict[str, Any]]
    cells: dict[str, dict[str, Any]]
    controls: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]

    @classmethod
    def load(cls, path: str | Path) -> "StudySpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study definition {path} does not exist (the default is configs/study.yaml)")
        data = yaml.safe_load(path.read_text()) or {}
        missing = [k for k in ("train", "modes", "regimes", "cells", "controls", "grid") if k not in data]
        if missing:
            raise ValueError(f"study definition {path} lacks the section(s) {missing}")
        return cls(**{k: data[k] or {} for k in ("train", "modes", "regimes", "cells", "controls", "grid")})

    def mode(self, name: str) -> dict[str, Any]:
        if name not in self.modes:
            raise ValueError(f"unknown study mode {name!r}; choose one of {sorted(self.modes)}")
        return self.modes[name]


@dataclass
class StudyPlan:
    """The runs of one study, in execution order (by wave, then as listed)."""

    mode: str
    seeds: list[int]
    regimes: list[str]
    runs: list[RunSpec] = field(default_factory=list)

    def by_id(self) -> dict[str, RunSpec]:
        return {r.run_id: r for r in self.runs}

    def waves(self) -> list[list[RunSpec]]:
        n = 1 + max((r.wave for r in self.runs), default=-1)
        return [[r for r in self.runs if r.wave == w] for w in range(n)]


def grid_points(grid: Mapping[str, Sequence[Any]], n_points: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n_points` points of the grid. Six factors of three levels: the 27-run orthogonal array (every pair of
    factors sees every pair of levels equally often), a seeded subset of it for fewer points, the full
    factorial for more. Other grids: a seeded sample of the full factorial."""
    names = list(grid)
    full = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    if n_points >= len(full):
        return full
    levels = {len(v) for v in grid.values()}
    if levels == {3} and len(names) <= 6:
        # rows (a, b, c) of Z_3^3; factors are pairwise independent linear forms, hence pairwise balanced
        forms = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)][:len(names)]
        rows = [{n: grid[n][sum(f * x for f, x in zip(form, abc)) % 3] for n, form in zip(names, forms)}
                for abc in itertools.product(range(3), repeat=3)]
        return rows if n_points >= 27 else random.Random(seed).sample(rows, n_points)
    return random.Random(seed).sample(full, n_points)


def expand_keys(point: Mapping[str, Any]) -> dict[str, Any]:
    """Grid factor names may list several config keys ("masks.tau_start,masks.tau_end") set to one value."""
    return {key.strip(): value for name, value in point.items() for key in name.split(",")}


def build_plan(spec: StudySpec, mode: str, seeds: Optional[int] = None, grid: bool = True) -> StudyPlan:
    """Every run of `mode`: each regime x (cells, controls in fine-tuning) x seed, with the learning-rate sweep
    on seed 0, and the grid points (one seed) on the `all` cell of the first regime."""
    m = spec.mode(mode)
    n_seeds = int(seeds if seeds is not None else m["seeds"])
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    regimes = list(m["regimes"])
    unknown = [r for r in regimes if r not in spec.regimes]
    if unknown:
        raise ValueError(f"mode {mode} names unknown regime(s) {unknown}; known: {sorted(spec.regimes)}")
    sweep = [float(s) for s in m.get("lr_sweep") or []]
    plan = StudyPlan(mode=mode, seeds=list(range(n_seeds)), regimes=regimes)
    for regime in regimes:
        arms = dict(spec.cells)
        if regime == "finetune":
            arms.update(spec.controls)
        for arm, overrides in arms.items():
            plan.runs.extend(_arm_runs(regime, arm, dict(overrides), n_seeds, sweep))
    if grid and spec.grid and int(m.get("grid_points", 0)) > 0:
        regime = regimes[0]
        factors = {k: v for k, v in spec.grid.items() if not (regime == "finetune" and k == "model.d_model")}
        for i, point in enumerate(grid_points(factors, int(m["grid_points"]))):
            plan.runs.append(RunSpec(regime, "grid", 0, {**spec.cells["all"], **expand_keys(point)}, grid_index=i,
                                     grid_point=point))
    _assign_needs(plan)
    return plan


def _arm_runs(regime: str, arm: str, overrides: dict[str, Any], n_seeds: int, sweep: list[float]) -> list[RunSpec]:
    if not sweep:
        return [RunSpec(regime, arm, s, overrides) for s in range(n_seeds)]
    runs = [RunSpec(regime, arm, 0, overrides, lr_scale=scale) for scale in sweep]
    return runs + [RunSpec(regime, arm, s, overrides, lr_scale=SWEPT) for s in range(1, n_seeds)]


def _assign_needs(plan: StudyPlan) -> None:
    """Fill `needs` and `wave` (1 + the latest wave needed) for runs with unresolved values."""
    done: dict[str, RunSpec] = {}
    pending = list(plan.runs)
    ordered: list[RunSpec] = []
    while pending:
        progressed = False
        for run in list(pending):
            needs = _needs(run, plan.runs)
            if all(n in done for n in needs):
                wave = 1 + max((done[n].wave for n in needs), default=-1)
                resolved = dataclasses.replace(run, needs=tuple(needs), wave=wave)
                done[resolved.run_id] = resolved
                ordered.append(resolved)
                pending.remove(run)
                progressed = True
        if not progressed:
            raise ValueError("the study's runs depend on each other in a cycle: "
                             + ", ".join(r.run_id for r in pending))
    plan.runs = sorted(ordered, key=lambda r: r.wave)


def _needs(run: RunSpec, runs: Sequence[RunSpec]) -> list[str]:
    needs: list[str] = []
    if run.overrides.get("peft.lora_r") == MATCHED:
        needs += [r.run_id for r in runs if r.regime == run.regime and r.arm == "all" and r.seed == 0
                  and r.grid_index is None]
    if run.lr_scale == SWEPT:
        needs += [r.run_id for r in runs if r.regime == run.regime and r.arm == run.arm and r.seed == 0
                  and r.grid_index is None]
    return needs


def lora_params_per_rank(model: AdaptiveMambaConfig, targets: Sequence[str]) -> int:
    """Trainable LoRA parameters per unit of rank on every target projection of every layer: r * (in + out)."""
    shapes = {"in_proj": (model.d_model, 2 * model.d_inner),
              "x_proj": (model.d_inner, model.resolved_dt_rank + 2 * model.d_state),
              "dt_proj": (model.resolved_dt_rank, model.d_inner),
              "out_proj": (model.d_inner, model.d_model)}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"cannot count LoRA parameters of {unknown}; known projections: {sorted(shapes)}")
    return model.n_layer * sum(sum(shapes[t]) for t in targets)


def matched_rank(budget: float, per_rank: int) -> int:
    """The LoRA rank (>= 1) whose parameter count is closest to `budget`."""
    return max(1, int(round(budget / per_rank)))


def resolve_overrides(run: RunSpec, results: Mapping[str, Mapping[str, Any]], model: AdaptiveMambaConfig,
                      targets: Sequence[str]) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """(overrides, lr_scale, notes) of `run` with MATCHED and SWEPT replaced from the results it needs."""
    overrides, scale, notes = dict(run.overrides), run.lr_scale, {}
    missing = [n for n in run.needs if n not in results]
    if missing:
        raise ValueError(f"run {run.run_id} needs the results of {missing} first")
    if overrides.get("peft.lora_r") == MATCHED:
        budgets = [results[n]["trainable_params"] for n in run.needs if results[n]["arm"] == "all"]
        budget = sum(budgets) / len(budgets)
        overrides["peft.lora_r"] = matched_rank(budget, lora_params_per_rank(model, targets))
        notes["matched_budget"] = budget
    if scale == SWEPT:
        sweep = [results[n] for n in run.needs if results[n]["arm"] == run.arm]
        best = min(sweep, key=lambda r: r["eval_loss"])
        scale = float(best["lr_scale"])
        notes["swept_from"] = {r["run_id"]: r["eval_loss"] for r in sweep}
    return overrides, float(scale), notes
