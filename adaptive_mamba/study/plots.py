"""The study's figures (PNG, matplotlib's Agg backend), all drawn from comprehensive_results.json's content."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from adaptive_mamba.study.report import chosen_runs

KIND_CODE = {"frozen": 0, "ia3": 1, "lora": 2}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def efficiency_surface(result: Mapping[str, Any], path: Path) -> None:
    """Validation loss against inference FLOPs/token and trainable parameters, one point per run."""
    plt = _pyplot()
    fig = plt.figure(figsize=(7, 5.5))
    ax = fig.add_subplot(projection="3d")
    for arm in sorted({r["arm"] for r in result["runs"]}):
        pts = [r for r in result["runs"] if r["arm"] == arm and r.get("flops_forward_per_token")
               and r.get("trainable_params") and r.get("eval_loss") is not None]
        if pts:
            ax.scatter([math.log10(r["flops_forward_per_token"]) for r in pts],
                       [math.log10(r["trainable_params"]) for r in pts], [r["eval_loss"] for r in pts], label=arm)
    ax.set_xlabel("log10 inference FLOPs / token")
    ax.set_ylabel("log10 trainable parameters")
    ax.set_zlabel("validation loss (nats)")
    ax.set_title("Efficiency surface")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text2D(0.5, 0.5, "no run reported FLOPs and parameters", ha="center", transform=ax.transAxes)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curves(result: Mapping[str, Any], path: Path) -> None:
    """Training loss per step, mean over seeds with a min-max band, one panel per regime."""
    plt = _pyplot()
    regimes = result["regimes"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        per_arm: dict[str, list[list[tuple[int, float]]]] = {}
        for (arm, _), r in chosen_runs(result["runs"], regime).items():
            per_arm.setdefault(arm, []).append(r["train_curve"])
        for arm, curves in sorted(per_arm.items()):
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            steps = [c[0] for c in curves[0][:n]]
            y = np.array([[v for _, v in c[:n]] for c in curves])
            line, = ax.plot(steps, y.mean(axis=0), label=f"{arm} ({len(curves)} seeds)", lw=1.2)
            ax.fill_between(steps, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.15)
        ax.set_title(f"{regime}: training loss (band: min-max over seeds)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hyperparameter_impact(result: Mapping[str, Any], path: Path) -> None:
    """Validation loss per level of each grid factor (mean ± standard error over grid points)."""
    plt = _pyplot()
    grid = result.get("grid") or {}
    n = max(1, len(grid))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5), squeeze=False)
    for ax, (factor, levels) in zip(axes[0], grid.items()):
        names = list(levels)
        ax.errorbar(range(len(names)), [levels[k]["mean"] for k in names],
                    yerr=[0 if math.isnan(levels[k]["se"]) else levels[k]["se"] for k in names], fmt="o-", capsize=4)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(factor, fontsize=9)
        ax.set_ylabel("validation loss")
    if not grid:
        axes[0][0].text(0.5, 0.5, "no grid runs in this study", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _module_matrix(values: Mapping[str, float]) -> tuple[np.ndarray, list[str], list[str]]:
    """{'blocks.3.mixer.in_proj': v} -> (layers x projections matrix, layer labels, projection labels)."""
    layers = sorted({int(name.split(".")[1]) for name in values})
    projs = sorted({name.rsplit(".", 1)[-1] for name in values})
    m = np.full((len(layers), len(projs)), np.nan)
    for name, v in values.items():
        m[layers.index(int(name.split(".")[1])), projs.index(name.rsplit(".", 1)[-1])] = v
    return m, [str(i) for i in layers], projs


def sparsity_importance_heatmaps(result: Mapping[str, Any], path: Path, arm: str = "all") -> None:
    """Per-layer, per-projection realised sparsity (mean over seeds) and last importance of one arm."""
    plt = _pyplot()
    runs = [r for r in result["runs"] if r["arm"] == arm and r.get("grid_index") is None]
    sparsity: dict[str, list[float]] = {}
    importance: dict[str, list[float]] = {}
    for r in runs:
        for name, v in (r.get("module_sparsity") or {}).items():
            sparsity.setdefault(name, []).append(v)
        history = r.get("allocation_history") or []
        if history:
            for name, v in history[-1]["importance"].items():
                importance.setdefault(name, []).append(v)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, data) in zip(axes, (("realised sparsity", sparsity), ("importance (last allocation)", importance))):
        if not data:
            ax.text(0.5, 0.5, f"no {title} recorded for arm {arm}", ha="center", va="center")
            ax.set_axis_off()
            continue
        m, rows, cols = _module_matrix({k: float(np.mean(v)) for k, v in data.items()})
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylabel("layer")
        ax.set_title(f"{arm}: {title}")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def allocation_over_time(result: Mapping[str, Any], path: Path, arm: str = "all") -> None:
    """Kind (frozen / IA3 / LoRA) of every module at every allocation decision of one run of `arm` (seed 0)."""
    plt = _pyplot()
    run = next((r for r in sorted(result["runs"], key=lambda r: r["run_id"])
                if r["arm"] == arm and r.get("grid_index") is None and r.get("allocation_history")), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if run is None:
        ax.text(0.5, 0.5, f"no allocation decisions recorded for arm {arm}", ha="center", va="center")
        ax.set_axis_off()
    else:
        history = run["allocation_history"]
        names = list(history[0]["kinds"])
        m = np.array([[KIND_CODE[h["kinds"].get(n, "frozen")] for h in history] for n in names])
        from matplotlib.colors import ListedColormap

        ax.imshow(m, aspect="auto", cmap=ListedColormap(["#d9d9d9", "#6baed6", "#08519c"]), vmin=0, vmax=2)
        ax.set_xticks(range(len(history)), [str(h["step"]) for h in history])
        ax.set_yticks(range(len(names)), [n.replace("blocks.", "").replace(".mixer", "") for n in names], fontsize=7)
        ax.set_xlabel("decision at step")
        ax.set_title(f"{run['run_id']}: allocation (grey frozen, light IA3, dark LoRA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"efficiency_surface.png": efficiency_surface, "loss_curves.png": loss_curves,
         "hyperparameter_impact.png": hyperparameter_impact,
         "sparsity_importance_heatmaps.png": sparsity_importance_heatmaps,
         "allocation_over_time.png": allocation_over_time}


def draw_all(result: Mapping[str, Any], out: Path) -> Sequence[Path]:
    """Every figure into OUT/plots; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in PLOTS.items():
        draw(result, out / name)
        paths.append(out / name)
    return paths
