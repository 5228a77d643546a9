"""Evaluation suite: WikiText, PG-19, CNN/DailyMail, HotpotQA and HumanEval.

    python eval/run_suite.py --model DIR --tasks wikitext,pg19,cnn_dm,hotpotqa,humaneval \
        --data-dir ../shared/data --limit 10 --out results/eval.json
    python eval/run_suite.py --predictions other_system.jsonl --tasks cnn_dm,hotpotqa \
        --data-dir ../shared/data --out results/other.json

Writes, after every task, the results JSON (scores with standard errors, counts, settings, timing,
versions), a markdown table next to it (`.md`), for our model its predictions
(`.predictions.jsonl`, the format `--predictions` reads), per-sample logs (`.samples.TASK.jsonl`;
always for humaneval, for every task with --log-samples). A rerun with the same --out skips the
tasks already finished. Bad input: a one-line error and exit status 2. See README.md, "Evaluation".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # run from any folder of a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from adaptive_mamba.evaluation import tasks as T  # noqa: E402
from adaptive_mamba.evaluation.sources import InputError  # noqa: E402
from adaptive_mamba.evaluation.suite import (  # noqa: E402
    EvalConfig,
    load_model,
    log_to_wandb,
    markdown_table,
    read_predictions,
    run_suite,
    score_prediction_file,
)


def parse_data(values: list[str]) -> dict[str, Path]:
    """`task=PATH` pairs (repeatable, or comma-separated)."""
    out = {}
    for item in (v for value in values for v in value.split(",") if v):
        task, sep, path = item.partition("=")
        if not sep or task not in T.ALL_TASKS:
            raise InputError(f"--data expects TASK=PATH with TASK in {', '.join(T.ALL_TASKS)}; "
                             f"got {item!r}")
        out[task] = Path(path)
    return out


def parse_ks(value: str) -> tuple[int, ...]:
    """`--k 1,10,100`."""
    try:
        return tuple(int(k) for k in value.split(","))
    except ValueError:
        raise InputError(f"--k expects comma-separated integers such as 1,10,100; got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="model directory (ours, transformers Mamba or state-spaces)")
    src.add_argument("--predictions", type=Path, help="score another system's predictions JSONL instead")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model directory)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of {','.join(T.ALL_TASKS)} (default: all; with "
                        "--predictions: the tasks the file covers)")
    p.add_argument("--data-dir", type=Path, help="a folder laid out like shared/data")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="data file/folder for one task (overrides --data-dir); default: Hugging Face")
    p.add_argument("--limit", type=int, help="first N examples (books, articles, questions) per task")
    p.add_argument("--batch-size", type=int, default=4,
                   help="windows (rolling) or documents (recurrent) per forward pass")
    p.add_argument("--max-length", type=int, default=2048, help="rolling-window length in tokens")
    p.add_argument("--chunk-length", type=int, default=4096, help="recurrent mode: tokens per chunk")
    p.add_argument("--max-new-tokens", type=int, help="generation limit (default: per task)")
    p.add_argument("--samples", type=int, default=1, help="HumanEval samples per problem")
    p.add_argument("--k", default=None,
                   help="pass@k values, e.g. 1,10 (default: 1,10,100 as far as --samples allows; "
                        "a k above --samples is left out with a warning)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sandbox-timeout", type=float, default=3.0, help="seconds per HumanEval program")
    p.add_argument("--sandbox-workers", type=int, default=2)
    p.add_argument("--position-bucket", type=int, default=0,
                   help="PG-19: perplexity per bucket of N token positions (+ SVG plot); 0 = off")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=Path("eval_results.json"),
                   help="results JSON; a rerun with the same --out skips the tasks it finished")
    p.add_argument("--overwrite", action="store_true", help="redo every task, replacing --out")
    p.add_argument("--log-samples", action="store_true",
                   help="write per-sample JSONL (prompt, generation, reference, scores) per task")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE applies)")
    p.add_argument("--wandb-project", default="adaptive-mamba-eval")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the parsed arguments say; bad input raises InputError (or FileNotFoundError)."""
    if args.tasks is None:
        tasks = list(read_predictions(args.predictions).texts) if args.predictions else list(T.ALL_TASKS)
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    cfg = EvalConfig(tasks=tasks, data_dir=args.data_dir, data=parse_data(args.data),
                     limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                     chunk_length=args.chunk_length, max_new_tokens=args.max_new_tokens,
                     samples=args.samples, ks=parse_ks(args.k) if args.k else None,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                     sandbox_timeout=args.sandbox_timeout, sandbox_workers=args.sandbox_workers,
                     position_bucket=args.position_bucket)
    if args.predictions:
        return score_prediction_file(args.predictions, cfg, args.out, args.overwrite, args.log_samples)
    model, tokenizer = load_model(args.model, args.tokenizer, args.device, args.dtype)
    extra = {"device": str(next(model.parameters()).device), "dtype": args.dtype,
             "tokenizer": tokenizer.name}
    return run_suite(model, tokenizer, cfg, str(args.model), args.out, args.overwrite,
                     args.log_samples, extra)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
    except (InputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.wandb:
        log_to_wandb(results, args.wandb_project, run_name=args.out.stem)
    print(markdown_table(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return results


def cli() -> int:
    """The `adaptive-mamba-eval` console script (main returns the results, for tests)."""
    main()
    return 0


if __name__ == "__main__":
    main()
