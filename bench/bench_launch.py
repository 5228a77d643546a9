"""Start-up of the deepspeed launcher vs torchrun on CPU: 2 ranks of launch/train.py, same run, same machine.

    python bench/bench_launch.py --data-dir .cache/test_train_data [--repeats 2]

Per launcher and repeat: seconds from starting the command to the first optimizer step's log line (the whole
start-up: launcher, imports, process group, DeepSpeed engine, data), and seconds for a run that stops at once
with a config error (launcher + Python imports only). Runs alternate between the launchers so that load changes
hit both alike; prints the medians and the ratio deepspeed / torchrun.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layer=2", "train.seq_len=128", "train.batch_size=1", "logging.wandb=false",
        "logging.progress_bar=false",
        "eval.batches=1", "train.export_at_end=false", "train.max_steps=1", "train.zero_stage=2"]


def launcher(name: str, port: int) -> list[str]:
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]


def seconds_to_first_step(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 1/" in line:
            elapsed = time.perf_counter() - t0
            proc.wait()
            return elapsed
    raise RuntimeError(f"{cmd[:4]} never logged a step (exit {proc.wait()})")


def seconds_to_exit(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    results: dict[tuple[str, str], list[float]] = {}
    port = 29610
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in ("torchrun", "deepspeed"):
                port += 1
                train = ["launch/train.py", f"data.dir={args.data_dir.resolve()}", f"train.output_dir={tmp}/{name}{r}", *TINY]
                results.setdefault((name, "first step"), []).append(
                    seconds_to_first_step([*launcher(name, port), *train], env))
                port += 1
                results.setdefault((name, "config error exit"), []).append(
                    seconds_to_exit([*launcher(name, port), *train, "peft.lora_r=0"], env))
    for what in ("first step", "config error exit"):
        t, d = statistics.median(results[("torchrun", what)]), statistics.median(results[("deepspeed", what)])
        print(f"{what:>18}: torchrun {t:6.1f} s  deepspeed {d:6.1f} s  deepspeed/torchrun {d / t:4.2f}  "
              f"(runs: {results[('torchrun', what)]} / {results[('deepspeed', what)]})")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
