"""The study's planning and statistics: what runs, in which order, and how effects are estimated."""
from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from adaptive_mamba.config import AdaptiveMambaConfig
from adaptive_mamba.study import report
from adaptive_mamba.study.plan import (MATCHED, SWEPT, RunSpec, StudySpec, build_plan, grid_points,
                                       lora_params_per_rank, resolve_overrides)
from adaptive_mamba.study.stats import bootstrap_ci, contrast, holm, sign_flip_p

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec() -> StudySpec:
    return StudySpec.load(REPO / "configs" / "study.yaml")


def test_orthogonal_array_balances_every_pair_of_factors(spec: StudySpec) -> None:
    points = grid_points(spec.grid, 27)
    assert len(points) == 27 and len({tuple(sorted(p.items())) for p in points}) == 27
    for a, b in itertools.combinations(spec.grid, 2):
        pairs = Counter((p[a], p[b]) for p in points)
        assert len(pairs) == 9 and set(pairs.values()) == {3}, (a, b)
    assert len(grid_points(spec.grid, 5)) == 5
    assert len(grid_points(spec.grid, 10 ** 6)) == 3 ** 6


def test_pilot_plan_has_every_cell_and_control_with_paired_seeds(spec: StudySpec) -> None:
    plan = build_plan(spec, "pilot")
    arms = Counter(r.arm for r in plan.runs if r.grid_index is None)
    expected = set(spec.cells) | set(spec.controls)
    assert set(arms) == expected and set(arms.values()) == {len(plan.seeds)}
    assert len(plan.seeds) >= 2 and len(spec.cells) >= 5
    by_id = plan.by_id()
    for run in plan.runs:                       # every run comes after what it needs
        assert all(by_id[n].wave < run.wave for n in run.needs)
    matched = [r for r in plan.runs if r.overrides.get("peft.lora_r") == MATCHED]
    assert matched and all(r.needs == ("finetune-all-s0",) for r in matched)


def test_sweep_and_matched_rank_resolve_from_results(spec: StudySpec) -> None:
    plan = build_plan(spec, "research")
    later = next(r for r in plan.runs if r.arm == "lora_matched" and r.lr_scale == SWEPT)
    assert later.wave == 2                       # all (wave 0) -> lora_matched sweep (1) -> its other seeds (2)
    model = AdaptiveMambaConfig(d_model=64, n_layer=2)
    targets = ["in_proj", "x_proj", "out_proj"]
    per_rank = lora_params_per_rank(model, targets)
    d_inner, dt_rank, d_state = 128, 4, 16
    assert per_rank == 2 * ((64 + 2 * d_inner) + (d_inner + dt_rank + 2 * d_state) + (d_inner + 64))

    matched = RunSpec("finetune", "lora_matched", 0, {"peft.lora_r": MATCHED}, needs=("a", "b"))
    budgets = {"a": {"arm": "all", "trainable_params": 3.2 * per_rank},
               "b": {"arm": "all", "trainable_params": 3.6 * per_rank}}
    overrides, scale, notes = resolve_overrides(matched, budgets, model, targets)
    assert overrides["peft.lora_r"] == 3 and scale == 1.0 and notes["matched_budget"] == pytest.approx(3.4 * per_rank)

    sweep = {f"s{x}": {"run_id": f"s{x}", "arm": "lora_matched", "lr_scale": x, "eval_loss": loss}
             for x, loss in ((0.5, 3.0), (1.0, 2.5), (2.0, 2.7))}
    swept = RunSpec("finetune", "lora_matched", 1, {"peft.lora_r": 4}, lr_scale=SWEPT, needs=tuple(sweep))
    assert resolve_overrides(swept, sweep, model, targets)[1] == 1.0
    with pytest.raises(ValueError, match="needs the results"):
        resolve_overrides(swept, {}, model, targets)


def test_bootstrap_sign_flip_and_holm_against_closed_forms() -> None:
    low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= low < 2.5 < high <= 4.0
    assert sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)       # only all-plus and all-minus are as extreme
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    adj = holm({"a": 0.5, "b": math.nan})
    assert adj["a"] == 0.5 and math.isnan(adj["b"])


def test_interaction_contrast_is_paired_by_seed() -> None:
    values = {"all": {0: 1.0, 1: 2.0}, "masks_peft": {0: 3.0, 1: 5.0}, "masks_scan": {0: 2.0, 1: 1.0},
              "masks": {0: 4.0}}
    weights = report.EFFECTS["synergy"][0]
    assert contrast(values, weights) == {0: 1.0 - 3.0 - 2.0 + 4.0}      # seed 1 lacks the masks arm


def _result(arm: str, seed: int, loss: float, curve: list[float]) -> dict:
    return {"run_id": f"finetune-{arm}-s{seed}", "regime": "finetune", "arm": arm, "seed": seed, "grid_index": None,
            "lr_scale": 1.0, "eval_loss": loss, "train_curve": [[i + 1, v] for i, v in enumerate(curve)],
            "time_curve": [0.5 * (i + 1) for i in range(len(curve))], "trainable_params": 1000 if arm == "base" else 100,
            "flops_forward_per_token": 2e6, "peak_memory_mb": 100.0, "tokens_per_s": 10.0, "overrides": {},
            "sparsity": 0.5}


def test_convergence_and_effects_from_results(tmp_path: Path) -> None:
    results = {}
    for seed in (0, 1, 2):
        for arm, loss, curve in (("base", 3.0, [5, 4, 3, 3, 3]), ("all", 2.9, [5, 3, 2.5, 2.4, 2.4])):
            r = _result(arm, seed, loss + 0.01 * seed, [c + 0.01 * seed for c in curve])
            results[r["run_id"]] = r
    rows = report.derive(results)
    base0 = next(r for r in rows if r["run_id"] == "finetune-base-s0")
    all0 = next(r for r in rows if r["run_id"] == "finetune-all-s0")
    smooth = report._ema([5, 4, 3, 3, 3])
    assert base0["target_loss"] == pytest.approx(smooth[-1])
    assert all0["steps_to_target"] == 1 + next(i for i, v in enumerate(report._ema([5, 3, 2.5, 2.4, 2.4]))
                                               if v <= smooth[-1])
    eff = report.effects(rows, ["finetune"])["finetune/all_vs_base"]["metrics"]
    assert eff["eval_loss"]["mean"] == pytest.approx(-0.1)
    assert eff["trainable_params"]["mean"] == pytest.approx(-900)
    claims = {c["claim"]: c for c in report.claims(rows, report.effects(rows, ["finetune"]), ["finetune"])}
    assert claims["85-95% fewer trainable parameters"]["measured"] == pytest.approx(90.0)
    assert claims["85-95% fewer trainable parameters"]["verdict"] == "holds"
    assert claims["30-70% sparsity"]["measured"] == pytest.approx(50.0)
    out = report.build(tmp_path, {"mode": "pilot", "regimes": ["finetune"], "seeds": [0, 1, 2], "runs": [0] * 6},
                       results, {})
    assert (tmp_path / "RESEARCH_REPORT.md").read_text().count("| all |") == 1
    assert np.isclose(out["arms"]["finetune"]["all"]["eval_loss"]["mean"], 2.91)


def test_every_run_of_every_mode_is_a_valid_train_config(spec: StudySpec, tmp_path: Path) -> None:
    """configs/study.yaml: each run of each mode builds a TrainConfig (unknown keys and bad values would fail)."""
    from adaptive_mamba.study.runner import RunContext, train_config, write_run_config
    from adaptive_mamba.training.config import load_train_config

    for mode in spec.modes:
        ctx = RunContext(spec, mode, tmp_path, REPO, {"pretrain": tmp_path / "a", "finetune": tmp_path / "b"},
                         base_model=tmp_path / "base")
        for run in build_plan(spec, mode).runs:
            matched = run.overrides.get("peft.lora_r") == MATCHED
            write_run_config(train_config(run, ctx, {**run.overrides, "peft.lora_r": 2} if matched else run.overrides,
                                          1.0), tmp_path / "config.yaml")
            with warnings.catch_warnings():
                warnings.simplefilter("error")          # no deprecated keys either
                cfg = load_train_config(tmp_path / "config.yaml")
            assert cfg.train.seed == run.seed and (cfg.train.init_from is not None) == (run.regime == "finetune")
