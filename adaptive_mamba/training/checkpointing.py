"""Atomic, verifiable training checkpoints.

Layout under `<output_dir>/checkpoints/`::

    step_00000100/                  one complete checkpoint
        engine/state/...            DeepSpeed engine state (module, optimizer partitions of every rank)
        trainer.json                step, data position, pillar decisions, the TrainConfig
        rank_00000.pt ...           per-rank RNG states (torch, numpy, python) and pillar statistics
        MANIFEST.json               written last: size and sha256 of every file above
    latest                          text file naming the newest complete checkpoint

A checkpoint is written into `.tmp-step_...` and renamed into place only after every rank has
finished and the manifest is written, then `latest` is replaced atomically. A crash mid-save leaves
only a `.tmp-*` folder (removed by the next save), so the last good checkpoint is never touched.
Loading verifies the manifest first: a truncated or altered file is a clear error, not a silent
half-load.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from adaptive_mamba.fileio import file_sha256
from adaptive_mamba.training.distributed import barrier

MANIFEST = "MANIFEST.json"
LATEST = "latest"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"
TRAINER_FILE = "trainer.json"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint directory that is incomplete or altered; the message names the file and the fix."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], rank: int, keep_last: int) -> Path:
    """Write a complete checkpoint for `step` (a collective: every rank calls it). Returns its directory."""
    root = checkpoints_root(output_dir)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)     # an earlier save that crashed midway
        tmp.mkdir()
    barrier()
    engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
    torch.save(rank_state, rank_file(tmp, rank))
    if rank == 0:
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1, default=str) + "\n")
    barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size,
                                                                      "sha256": file_sha256(p)} for p in files}}
        _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        if final.exists():                 # re-saving the same step (e.g. preempted right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, final.name + "\n")
        complete = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check the manifest (presence, sizes, sha256) and return trainer.json; raise CheckpointCorruptError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {directory} does not exist")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointCorruptError(f"checkpoint {directory} has no {MANIFEST}: it was never completed (a save "
                                     "interrupted midway). Resume from an earlier checkpoint in "
                                     f"{directory.parent} or start fresh (resume=none)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointCorruptError(f"{manifest_path} is not valid JSON ({err}); the checkpoint is corrupt") from err
    for rel, info in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint {directory} is missing {rel}; it is corrupt. Resume from an "
                                         f"earlier checkpoint in {directory.parent} (resume=PATH)")
        if path.stat().st_size != info["bytes"] or file_sha256(path) != info["sha256"]:
            raise CheckpointCorruptError(f"checkpoint file {path} does not match its manifest (size or sha256 "
                                         "differs): the checkpoint is corrupt. Resume from an earlier checkpoint in "
                                         f"{directory.parent} (resume=PATH)")
    return json.loads((directory / TRAINER_FILE).read_text())


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under output_dir (via `latest`, else the highest complete step), or None."""
    root = checkpoints_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / MANIFEST).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
    return complete[-1] if complete else None


def resolve_resume(resume: str, output_dir: str | Path) -> Optional[Path]:
    """`resume`: none -> None; auto -> the latest complete checkpoint or None; otherwise a checkpoint path."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)   # an output_dir was given: take its latest checkpoint
        if found is None:
            raise FileNotFoundError(f"train.resume={resume}: no complete checkpoint under {path / 'checkpoints'}")
        return found
    if not path.exists():
        raise FileNotFoundError(f"train.resume={resume}: no such checkpoint directory")
    return path
