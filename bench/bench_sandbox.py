"""HumanEval sandbox cost: programs run under bubblewrap vs the same programs unconfined.

Both run the canonical solutions of the first N HumanEval problems with the same interpreter
(`python -I -S`), `workers` at a time. Ours adds the namespaces, the read-only file system, the
rlimits, the guard and the token handshake. Prints seconds per program for each and the ratio.
The unconfined side exists only to price the isolation: never run untrusted code that way.

    .venv/bin/python bench/bench_sandbox.py [--problems 40] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from adaptive_mamba.evaluation.sandbox import check_isolation_available, run_programs
from adaptive_mamba.evaluation.sources import load_humaneval
from adaptive_mamba.evaluation.tasks import humaneval_program


def unconfined(program: str) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(program)
    try:
        return subprocess.run([sys.executable, "-I", "-S", f.name], capture_output=True,
                              timeout=30, check=False).returncode == 0
    finally:
        os.unlink(f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    check_isolation_available()
    programs = [humaneval_program(p, p["canonical_solution"]) for p in load_humaneval(None)[:args.problems]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        plain_ok = sum(pool.map(unconfined, programs))
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_ok = sum(r.passed for r in run_programs(programs, workers=args.workers, desc="bwrap"))
    ours = time.perf_counter() - t0

    n = len(programs)
    print(f"{n} canonical programs, {args.workers} workers, load {os.getloadavg()[0]:.1f}")
    print("| runner | passed | s/program | ratio |\n| --- | --- | --- | --- |")
    print(f"| unconfined python | {plain_ok}/{n} | {plain / n:.3f} | 1.00 |")
    print(f"| bubblewrap sandbox | {ours_ok}/{n} | {ours / n:.3f} | {ours / plain:.2f} |")


if __name__ == "__main__":
    main()
