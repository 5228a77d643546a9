"""Run any launcher of launch/train.py and exit with the training exit contract.

    python launch/run.py torchrun --nproc_per_node 2 launch/train.py --config c.yaml
    python launch/run.py deepspeed --num_gpus 2 launch/train.py --config c.yaml
    python launch/run.py python launch/train.py --config c.yaml

The contract: 0 done, 2 bad input (config, data, checkpoint, tokenizer), 99 preempted (checkpoint
saved: rerun with train.resume=auto), 1 anything else. torchrun and the deepspeed launcher report any
failing worker as 1 (plus a traceback of their own), so every rank of launch/train.py writes an exit
record `rank_<R>.json` into $ADAPTIVE_MAMBA_EXIT_DIR; this wrapper points that variable at a fresh
folder, runs the launcher, and exits with the records' combined code (`combine`): 1 if any rank
failed, else 2 if any rank had bad input, else 1 if a rank left no record while the launcher
failed, else 99 if any rank was preempted, else 0. slurm/train.sh reads the same records after srun.

Signals: schedulers (scancel, preemption, time limits) and terminals signal the whole process
group, so the ranks receive them directly. The wrapper itself only keeps waiting for the launcher,
so that it can still read the records and report.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

EXIT_DONE, EXIT_OTHER, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 99
EXIT_DIR_ENV = "ADAPTIVE_MAMBA_EXIT_DIR"


def write_record(directory: str | Path, rank: int, code: int, message: str = "") -> None:
    """Rank `rank`'s exit record (written atomically, so a reader never sees half a file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank_{rank}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"rank": rank, "code": code, "message": message}) + "\n")
    os.replace(tmp, path)


def read_records(directory: str | Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("rank_*.json"))]


def combine(records: list[dict], launcher_code: int, world_size: int | None = None) -> int:
    """The job's exit code from its ranks' records and the launcher's own exit status."""
    codes = {r["code"] for r in records}
    missing = not records or (world_size is not None and len(records) < world_size)
    if EXIT_OTHER in codes or codes - {EXIT_DONE, EXIT_BAD_INPUT, EXIT_PREEMPTED}:
        return EXIT_OTHER
    if EXIT_BAD_INPUT in codes:             # the other ranks may have been killed by the launcher meanwhile
        return EXIT_BAD_INPUT
    if missing and launcher_code != 0:      # a rank died without a record (killed, crashed in C code)
        return EXIT_OTHER
    if EXIT_PREEMPTED in codes:
        return EXIT_PREEMPTED
    return EXIT_DONE if launcher_code == 0 else EXIT_OTHER


def main(argv: list[str]) -> int:
    if argv[:1] == ["--combine"]:           # slurm/train.sh: --combine DIR LAUNCHER_CODE [WORLD_SIZE]
        directory, code, *world = argv[1:]
        return combine(read_records(directory), int(code), int(world[0]) if world else None)
    if not argv:
        print(__doc__, file=sys.stderr)
        return EXIT_BAD_INPUT
    with tempfile.TemporaryDirectory(prefix="train-exit-") as directory:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda *_: None)     # the ranks got it too (group signal); keep waiting
        proc = subprocess.Popen(argv, env={**os.environ, EXIT_DIR_ENV: directory})
        while True:
            try:
                launcher_code = proc.wait()
                break
            except InterruptedError:
                continue
        return combine(read_records(directory), launcher_code)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
