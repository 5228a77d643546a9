"""Fine-tuning study, side by side: a small Mamba pretrained on one book (Emma) is fine-tuned on another (the KJV)
for a fixed number of steps with the hybrid allocation, uniform LoRA at matched trainable parameters, and full
fine-tuning as the reference, over several seeds. Every run goes through launch/train.py (one CPU process).

The hybrid runs without masks (importance_source=saliency: gradient saliency, allocated before the first step and
re-decided every --realloc steps with the Adam state of survivors carried over), so that the comparison is about
where the adapters go, not about pruning. The LoRA rank is chosen so that uniform LoRA on every target has the
trainable-parameter count closest to the hybrid's (read from its first run). Prints the table of final validation
losses on the KJV.

    .venv/bin/python bench/bench_finetune.py [--steps 150] [--seeds 0 1 2] [--work runs/bench_finetune]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOKS = REPO.parent / "shared" / "data" / "books"
SHAPE = ["model.d_model=128", "model.n_layer=4", "train.seq_len=256", "train.batch_size=4", "scan_order.enabled=false",
         "logging.wandb=false", "logging.progress_bar=false", "train.zero_stage=2", "eval.batches=8", "logging.every=1000"]
TARGETS = "in_proj,x_proj,out_proj"


def chunked_book(book: Path, out: Path, chunk_chars: int, max_chars: int) -> Path:
    """The book as a .jsonl folder source, one document per `chunk_chars` characters (so a validation split
    exists)."""
    out.mkdir(parents=True, exist_ok=True)
    text = book.read_text(encoding="utf-8")[:max_chars]
    with (out / "docs.jsonl").open("w") as f:
        for i in range(0, len(text), chunk_chars):
            f.write(json.dumps({"text": text[i:i + chunk_chars]}) + "\n")
    return out


def shards(name: str, book: Path, work: Path, tokenizer: str, max_chars: int) -> Path:
    from adaptive_mamba.data import DataPrepConfig, build_shards

    source = chunked_book(book, work / f"{name}_text", 20_000, max_chars)
    return build_shards(DataPrepConfig(out_dir=work / f"{name}_data", source=f"folder:{source}", tokenizer=tokenizer,
                                       val_fraction=0.05))


def train(args: list[str], out: Path) -> dict:
    """One run of launch/train.py; returns its summary.json."""
    if not (out / "summary.json").is_file():
        proc = subprocess.run([sys.executable, "launch/train.py", f"train.output_dir={out}", *args], cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"run {out} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (out / "output.txt").write_text(proc.stdout + proc.stderr)
    return json.loads((out / "summary.json").read_text())


def adapter_params(out: Path) -> int:
    """Trainable adapter parameters of the first allocation of a finished run, from its log line
    'PEFT allocation at step S (N trainable parameters'."""
    log = (out / "output.txt").read_text()
    marks = [line for line in log.splitlines() if "trainable parameters" in line and "PEFT allocation" in line]
    return int(marks[0].split("(")[1].split(" trainable")[0].replace(",", "")) if marks else -1


def lora_params(rank: int, d_model: int = 128, n_layers: int = 4, d_state: int = 16) -> int:
    d_inner, dt_rank = 2 * d_model, -(-d_model // 16)
    shapes = [(d_model, 2 * d_inner), (d_inner, dt_rank + 2 * d_state), (d_inner, d_model)]   # in, x, out proj
    return n_layers * rank * sum(i + o for i, o in shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--realloc", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--work", default="runs/bench_finetune")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    t0 = time.perf_counter()
    emma = shards("emma", BOOKS / "austen_emma.txt", work, "sentencepiece:2048", 10 ** 9)
    kjv = shards("kjv", BOOKS / "kjv_bible.txt", work, str(emma / "tokenizer"), 1_000_000)
    base = train([f"data.dir={emma}", *SHAPE, f"train.max_steps={args.pretrain_steps}", "optim.lr=3e-3",
                  "optim.warmup_steps=20", "masks.enabled=false", "peft.enabled=false", "train.export_at_end=true"], work / "pretrain")
    base_dir = Path(base["export_dir"]) / "merged"
    common = [f"data.dir={kjv}", f"train.init_from={base_dir}", *SHAPE, f"train.max_steps={args.steps}",
              f"optim.lr={args.lr}", "optim.warmup_steps=10", "train.export_at_end=false", f"masks.targets={TARGETS}"]
    hybrid = ["peft.mode=hybrid", "masks.enabled=false", "peft.importance_source=saliency", "peft.lora_r=8",
              "peft.application_ratio=0.5", "peft.importance_threshold=0.5", f"peft.every={args.realloc}"]
    results: dict[str, list[float]] = {"before fine-tuning": []}
    params: dict[str, int] = {}
    for seed in args.seeds:
        out = work / f"hybrid_s{seed}"
        results.setdefault("hybrid", []).append(train([*common, *hybrid, f"train.seed={seed}"], out)["eval_loss_last"])
        params.setdefault("hybrid", adapter_params(out))
    rank = max(1, round(params["hybrid"] / lora_params(1)))
    params[f"lora r={rank}"] = lora_params(rank)
    for seed in args.seeds:
        results.setdefault(f"lora r={rank}", []).append(train(
            [*common, "peft.mode=lora", "masks.enabled=false", f"peft.lora_r={rank}", f"train.seed={seed}"],
            work / f"lora_r{rank}_s{seed}")["eval_loss_last"])
        summary = train([*common, "peft.mode=full", "masks.enabled=false", f"train.seed={seed}"], work / f"full_s{seed}")
        results.setdefault("full fine-tune", []).append(summary["eval_loss_last"])
        results["before fine-tuning"].append(summary["eval_loss_first"])
    params["full fine-tune"] = -1
    params["before fine-tuning"] = 0
    before = base["eval_loss_last"]
    print(f"base pretrained on Emma for {args.pretrain_steps} steps (Emma val loss {before:.3f}); fine-tuned on the KJV "
          f"for {args.steps} steps, seeds {args.seeds}, lr {args.lr}; {time.perf_counter() - t0:.0f} s in all")
    print(f"{'method':<16} {'trainable':>10}  {'KJV val loss per seed':<28} {'mean':>6}")
    for name, losses in results.items():
        n = params[name]
        print(f"{name:<16} {('all' if n < 0 else f'{n:,}'):>10}  {' '.join(f'{v:.3f}' for v in losses):<28} "
              f"{statistics.mean(losses):>6.3f}")


if __name__ == "__main__":
    main()
