"""Research study: the design document's ablation (base, each pillar, all pillars), controls, seeds and grid.

    python launch/study.py --mode pilot --out runs/study            # all artefacts in <= 15 min on 2 CPU cores
    python launch/study.py --mode research --out runs/research --resume
    sbatch slurm/study.sh --mode quick_research --out runs/qr       # one Slurm array task per run

Each run is `python launch/train.py` (the real trainer) with a config written into OUT/runs/RUN_ID/.
Finished runs keep a result file and are never redone: rerunning with --resume runs only what is
missing. The report (OUT/RESEARCH_REPORT.md, results.csv, comprehensive_results.json, plots/) is
rebuilt from the result files at the end. Corpora default to ../shared/data/books (Austen novels ->
the King James Bible) when present, else to this Python's standard library (modules -> tests).
Exit status: 0 done (even if some runs failed: they are listed in the report), 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

EXIT_BAD_INPUT = 2


def default_corpora() -> tuple[list[Path], list[Path]]:
    """Austen -> KJV from the shared data folder beside the checkout, when it exists (else: empty, the stdlib)."""
    books = REPO.parent / "shared" / "data" / "books"
    austen, kjv = sorted(books.glob("austen_*.txt")), books / "kjv_bible.txt"
    return (austen, [kjv]) if austen and kjv.is_file() else ([], [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch/study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["pilot", "quick_research", "research"], default=None,
                   help="study size (default: pilot, or the saved mode with --resume)")
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder (default: runs/study)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the mode's)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out: run only missing runs")
    p.add_argument("--epochs", type=int, default=None, help="train every run this many epochs instead of the "
                                                             "mode's max_steps")
    p.add_argument("--project", default="adaptive-mamba-study", help="W&B project (runs are grouped per study)")
    p.add_argument("--disable-grid-search", action="store_true", help="skip the hyper-parameter grid")
    p.add_argument("--disable-visualization", action="store_true", help="write no plots")
    p.add_argument("--definition", type=Path, default=REPO / "configs" / "study.yaml",
                   help="cells, controls, grid and modes (default: configs/study.yaml)")
    p.add_argument("--pretrain-corpus", type=Path, nargs="+", default=None,
                   help="text files or folders of .txt for pre-training / the base model")
    p.add_argument("--finetune-corpus", type=Path, nargs="+", default=None, help="text files or folders of .txt")
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "cache",
                   help="content-addressed data and base models, shared by studies (default: runs/cache)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun when > 1; default 1)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (default: one per CPU core, at most 8, without a GPU; 1 with one)")
    stage = p.add_argument_group("stages (used by slurm/study.sh)")
    stage.add_argument("--prepare-only", action="store_true",
                       help="prepare data and the base model, print 'WAVES n0 n1 ...' (runs per wave) and stop")
    stage.add_argument("--wave", type=int, default=None, help="with --run-index: run one run of this wave")
    stage.add_argument("--run-index", type=int, default=None, help="index of the run within --wave")
    stage.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    return p.parse_args(argv)


def options(args: argparse.Namespace):
    from adaptive_mamba.study import StudyOptions
    from adaptive_mamba.study.data import text_files

    import torch

    default_pre, default_fine = default_corpora()
    cores = os.cpu_count() or 1
    jobs = args.jobs or (1 if torch.cuda.is_available() else max(1, min(8, cores // args.nproc)))
    if jobs < 1 or args.nproc < 1:
        raise ValueError("--jobs and --nproc must be >= 1")
    saved_mode = None
    if args.resume and (args.out / "study.json").is_file():
        import json

        saved_mode = json.loads((args.out / "study.json").read_text())["options"]["mode"]
    return StudyOptions(
        mode=args.mode or saved_mode or "pilot", out=args.out, definition=args.definition, repo=REPO,
        seeds=args.seeds, grid=not args.disable_grid_search, plots=not args.disable_visualization,
        epochs=args.epochs, project=args.project,
        pretrain_corpus=text_files(args.pretrain_corpus) if args.pretrain_corpus else default_pre,
        finetune_corpus=text_files(args.finetune_corpus) if args.finetune_corpus else default_fine,
        cache=args.cache, nproc=args.nproc, jobs=jobs, threads_per_run=max(1, cores // (jobs * args.nproc)))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    args = parse_args(argv)
    from adaptive_mamba.study import Study

    try:
        study = Study(options(args))
        staged = args.wave is not None or args.report_only
        study.check_resumable(args.resume or staged)
        if args.report_only:
            study.report()
            return 0
        study.prepare()
        if args.prepare_only:
            print("WAVES " + " ".join(str(len(w)) for w in study.plan.waves()))
            return 0
        if args.wave is not None:
            if args.run_index is None:
                raise ValueError("--wave needs --run-index")
            study.run_index(args.wave, args.run_index)
            return 0
        study.run_all()
        study.report()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
