"""The entry points work from any folder: the scripts of a checkout, `python -m data_prep` and the console scripts
of pyproject.toml; relative paths in a training config resolve against the working directory."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.test_train_runs import TINY, _env, data_dir  # noqa: F401  (data_dir: fixture)

REPO = Path(__file__).resolve().parents[1]


def _outside_env() -> dict[str, str]:
    """The environment of a user in another folder: the scripts find the checkout themselves."""
    env = _env()
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.parametrize("script", ["launch/train.py", "launch/study.py", "eval/run_suite.py"])
def test_scripts_run_from_another_folder(script: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, env=_outside_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def test_data_prep_module_runs_from_another_folder(tmp_path: Path) -> None:
    env = {**_env(), "PYTHONPATH": str(REPO)}          # what `pip install -e .` gives: data_prep is a package
    proc = subprocess.run([sys.executable, "-m", "data_prep", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: python -m data_prep" in proc.stdout, proc.stderr[-2000:]


def test_console_scripts_name_callables_of_installed_packages() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"adaptive-mamba-train", "adaptive-mamba-study", "adaptive-mamba-prep", "adaptive-mamba-eval"}
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    sys.path.insert(0, str(REPO / "eval"))
    try:
        for target in scripts.values():
            module, func = target.split(":")
            assert any(module.split(".")[0] == p.rstrip("*") for p in packages), f"{module} is not installed"
            assert callable(getattr(importlib.import_module(module), func)), target
    finally:
        sys.path.remove(str(REPO / "eval"))


@pytest.mark.slow
def test_training_from_another_folder_resolves_relative_paths(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Relative train.output_dir, data.dir and train.deepspeed_extra are relative to the working directory."""
    work = tmp_path / "elsewhere"
    (work / "ds").mkdir(parents=True)
    (work / "ds" / "extra.json").write_text(json.dumps({"wall_clock_breakdown": False}))
    os.symlink(data_dir, work / "shards")
    config = work / "run.yaml"
    config.write_text("train: {output_dir: out, max_steps: 2, deepspeed_extra: ds/extra.json}\ndata: {dir: shards}\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", "run.yaml", *TINY],
                          cwd=work, env=_outside_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and any((work / "out" / "checkpoints").iterdir())
