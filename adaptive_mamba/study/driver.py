"""A study from start to report: prepare data and the base model, run what is missing, aggregate.

    study = Study(StudyOptions(mode="pilot", out=Path("runs/study")))
    study.prepare()        # data shards, the cached base model, OUT/study.json (the options and the plan)
    study.run_all()        # every run without a result file, wave by wave, with a progress bar
    study.report()         # results.csv, comprehensive_results.json, RESEARCH_REPORT.md, plots/

On a cluster each run is one array task: `prepare()` once, then `run_one(wave, index)` per task, then
`report()` (see slurm/study.sh). A finished run (one with a result file) is never redone.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm.auto import tqdm

from adaptive_mamba.study import data as study_data
from adaptive_mamba.study import plots, report
from adaptive_mamba.study.plan import RunSpec, StudyPlan, StudySpec, build_plan
from adaptive_mamba.study.runner import (RunContext, RunFailed, atomic_write_json, execute, launch, load_results,
                                         train_config)

STUDY_FILE = "study.json"
FAILED_FILE = "failed.json"


@dataclass
class StudyOptions:
    """What to study and where; `launch/study.py` builds this from its flags."""

    mode: str = "pilot"
    out: Path = Path("runs/study")
    definition: Path = Path("configs/study.yaml")
    repo: Path = Path(".")                       # holds launch/train.py
    seeds: Optional[int] = None                  # None: the mode's number
    grid: bool = True
    plots: bool = True
    epochs: Optional[int] = None
    project: str = "adaptive-mamba-study"
    pretrain_corpus: list[Path] = field(default_factory=list)    # empty: the standard library's modules
    finetune_corpus: list[Path] = field(default_factory=list)    # empty: the standard library's tests
    cache: Path = Path("runs/cache")
    nproc: int = 1                               # ranks per run
    jobs: int = 1                                # runs at a time
    threads_per_run: Optional[int] = None        # OMP_NUM_THREADS of each run (None: inherited)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) else v)
                for k, v in asdict(self).items()}


class Study:
    def __init__(self, options: StudyOptions, log: Callable[[str], None] = print) -> None:
        self.opts, self.log = options, log
        self.spec = StudySpec.load(options.definition)
        self.plan: StudyPlan = build_plan(self.spec, options.mode, options.seeds, options.grid)
        self.ctx: Optional[RunContext] = None

    # --------------------------------------------------------------------------------------- setup
    def check_resumable(self, resume: bool) -> None:
        """A folder holding another study's runs is only continued with `resume`, and only with the same plan."""
        saved = self.opts.out / STUDY_FILE
        if not saved.is_file():
            return
        if not resume:
            raise ValueError(f"{self.opts.out} already holds a study: pass --resume to continue it (only missing runs "
                             "are run) or choose another --out")
        previous = json.loads(saved.read_text())
        before = [r["run_id"] for r in previous["plan"]]
        now = [r.run_id for r in self.plan.runs]
        if before != now:
            raise ValueError(f"{self.opts.out} holds a study with another plan (mode {previous['options']['mode']}, "
                             f"{len(before)} runs; now {len(now)}): rerun with its options "
                             f"(--mode {previous['options']['mode']} --seeds {len(previous['seeds'])}) or another --out")

    def prepare(self) -> RunContext:
        """Token shards for each regime and the cached base model; writes OUT/study.json."""
        opts, mode = self.opts, self.spec.mode(self.opts.mode)
        opts.out.mkdir(parents=True, exist_ok=True)
        pre, fine = opts.pretrain_corpus, opts.finetune_corpus
        if not pre or not fine:
            std_pre, std_fine = study_data.stdlib_corpora()
            pre, fine = pre or std_pre, fine or std_fine
        max_mb, piece_kb = mode.get("corpus_mb"), int(mode.get("piece_kb", 32))
        val = float(self.spec.train.get("data.val_fraction", 0.1))      # a dotted key, like every train key
        self.log(f"study {opts.mode}: preparing data in {opts.cache} (cached across studies)")
        pre_dir = study_data.prepare_shards("pretrain", pre, opts.cache, str(mode.get("tokenizer", "sentencepiece:2048")),
                                            piece_kb, max_mb, val)
        data = {"pretrain": pre_dir}
        if "finetune" in self.plan.regimes:
            data["finetune"] = study_data.prepare_shards("finetune", fine, opts.cache, str(pre_dir / "tokenizer"),
                                                         piece_kb, max_mb, val)
        threads = {} if opts.threads_per_run is None else {"OMP_NUM_THREADS": str(opts.threads_per_run)}
        ctx = RunContext(self.spec, opts.mode, opts.out, opts.repo, data, project=opts.project, epochs=opts.epochs,
                         nproc=opts.nproc, env=threads)
        if "finetune" in self.plan.regimes:
            ctx.base_model = self._base_model(ctx)
        atomic_write_json(opts.out / STUDY_FILE, {"options": opts.to_dict(), "seeds": self.plan.seeds,
                                                  "regimes": self.plan.regimes,
                                                  "data": {k: str(v) for k, v in data.items()},
                                                  "base_model": str(ctx.base_model) if ctx.base_model else None,
                                                  "plan": [r.to_dict() for r in self.plan.runs]})
        self.ctx = ctx
        return ctx

    def _base_model(self, ctx: RunContext) -> Path:
        """The base cell pre-trained for `pretrain_steps` on the pre-training corpus, cached by content."""
        mode = self.spec.mode(self.opts.mode)
        base = RunSpec("pretrain", "base_model", 0, self.spec.cells["base"])
        config = {**train_config(base, ctx, base.overrides, 1.0), "train.max_steps": int(mode["pretrain_steps"]),
                  "train.num_epochs": 1, "logging.run_name": "base_model"}
        config.pop("train.output_dir")

        def train(out: Path, cfg: dict[str, Any]) -> None:
            self.log(f"pre-training the base model ({cfg['train.max_steps']} steps) into {out}")
            launch(ctx, cfg, out, "pre-training the base model")

        return study_data.cached_base_model(self.opts.cache, config, ctx.data["pretrain"], train)

    # ----------------------------------------------------------------------------------------- runs
    def _context(self) -> RunContext:
        return self.ctx if self.ctx is not None else self.prepare()

    def missing(self) -> list[RunSpec]:
        done = load_results(self.opts.out)
        return [r for r in self.plan.runs if r.run_id not in done]

    def _failed(self) -> dict[str, str]:
        path = self.opts.out / FAILED_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _train(self, run: RunSpec) -> tuple[RunSpec, Optional[str]]:
        """Train `run`; returns (run, error message or None). Safe to call from several threads."""
        try:
            execute(run, self._context(), load_results(self.opts.out))
        except (RunFailed, ValueError) as err:
            return run, str(err)
        return run, None

    def _record(self, run: RunSpec, error: Optional[str]) -> None:
        """Keep OUT/failed.json up to date (main thread only)."""
        failed = self._failed()
        if error is not None:
            failed[run.run_id] = error
            self.log(f"run {run.run_id} failed: {error}")
        elif run.run_id not in failed:
            return
        else:
            del failed[run.run_id]
        atomic_write_json(self.opts.out / FAILED_FILE, failed)

    def run_all(self) -> int:
        """Every missing run, wave by wave, `jobs` at a time; returns how many ran."""
        todo = self.missing()
        self.log(f"{len(self.plan.runs) - len(todo)} of {len(self.plan.runs)} runs already finished; {len(todo)} to "
                 f"run, {self.opts.jobs} at a time")
        self._context()
        with tqdm(total=len(todo), desc="study runs", unit="run", dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(max_workers=self.opts.jobs) as pool:
            for wave in range(1 + max((r.wave for r in todo), default=-1)):
                futures = [pool.submit(self._train, r) for r in todo if r.wave == wave]
                for future in as_completed(futures):
                    run, error = future.result()
                    self._record(run, error)
                    bar.set_postfix_str(run.run_id)
                    bar.update(1)
        return len(todo)

    def run_index(self, wave: int, index: int) -> None:
        """Run `index` of wave `wave` (a Slurm array task), unless it is finished."""
        waves = self.plan.waves()
        if not 0 <= wave < len(waves) or not 0 <= index < len(waves[wave]):
            raise ValueError(f"the plan has waves of sizes {[len(w) for w in waves]}; no run {index} in wave {wave}")
        run = waves[wave][index]
        if run.run_id not in load_results(self.opts.out):
            self._record(*self._train(run))

    # ---------------------------------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        """Aggregate every finished run into the report files (and plots unless disabled)."""
        results = load_results(self.opts.out)
        failed = self._failed()
        plan = {"mode": self.opts.mode, "regimes": self.plan.regimes, "seeds": self.plan.seeds,
                "runs": [r.to_dict() for r in self.plan.runs]}
        result = report.build(self.opts.out, plan, results, failed)
        if self.opts.plots:
            plots.draw_all(result, self.opts.out / "plots")
        self.log(f"report: {self.opts.out / 'RESEARCH_REPORT.md'} ({result['n_runs']} of {result['n_planned']} runs)")
        return result
