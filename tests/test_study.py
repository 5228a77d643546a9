"""`python launch/study.py` end to end on a tiny study: real training runs, interruption and resume, report,
plots, and a report that follows the result files."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_MODE = {"seeds": 2, "regimes": ["finetune"], "grid_points": 1, "lr_sweep": [], "pretrain_steps": 20,
             "corpus_mb": 0.3,
             "train": {"model.d_model": 32, "model.n_layer": 2, "train.seq_len": 128, "train.batch_size": 2,
                       "train.max_steps": 8, "optim.lr": 3e-3, "eval.every": 4, "logging.every": 4, "eval.batches": 2,
                       "scan_order.every": 4, "peft.every": 4}}


def _definition(tmp: Path) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "study.yaml").read_text())
    spec["modes"] = {"pilot": TINY_MODE}
    spec["cells"] = {k: spec["cells"][k] for k in ("base", "scan", "masks", "all")}
    spec["controls"] = {"lora_matched": spec["controls"]["lora_matched"]}
    path = tmp / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _command(definition: Path, out: Path, cache: Path, books: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "study.py"), "--definition", str(definition), "--out", str(out),
            "--cache", str(cache), "--pretrain-corpus", str(books / "austen_emma.txt"),
            "--finetune-corpus", str(books / "kjv_bible.txt"), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _results(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in (out / "runs").glob("*/result.json")}


@pytest.fixture(scope="module")
def study(tmp_path_factory, shared_data: Path) -> dict:
    """A study interrupted after its first two finished runs (two at a time: each run is one single-threaded
    process), then resumed to the end."""
    tmp = tmp_path_factory.mktemp("study")
    definition, out, cache = _definition(tmp), tmp / "out", tmp / "cache"
    cmd = _command(definition, out, cache, shared_data / "books", "--jobs", "2")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 600
    while len(_results(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _results(out)
    assert len(before) >= 2, "the study did not finish two runs before the deadline"
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"out": out, "cmd": cmd, "before": before, "log": resumed.stdout + resumed.stderr}


def test_resume_runs_only_the_missing_runs(study: dict) -> None:
    plan = json.loads((study["out"] / "study.json").read_text())["plan"]
    after = _results(study["out"])
    assert set(after) == {r["run_id"] for r in plan}
    for run_id, content in study["before"].items():
        assert after[run_id] == content, f"finished run {run_id} was redone"
    assert f"{len(study['before'])} of {len(plan)} runs already finished; {len(plan) - len(study['before'])} to run" \
        in study["log"]


def test_a_folder_with_a_study_needs_resume(study: dict, capsys: pytest.CaptureFixture) -> None:
    """launch/study.py's main with the same arguments, in this process (the fixture ran it as a program)."""
    from launch.study import main

    assert main(study["cmd"][2:]) == 2 and "pass --resume" in capsys.readouterr().err


def test_artefacts_hold_every_run_and_metric(study: dict) -> None:
    out = study["out"]
    result = json.loads((out / "comprehensive_results.json").read_text())
    assert result["n_runs"] == result["n_planned"] == 11           # 4 cells + 1 control, 2 seeds; 1 grid point
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 11 and {"run_id", "eval_loss", "trainable_params", "steps_to_target"} <= set(rows[0])
    arms = result["arms"]["finetune"]
    assert set(arms) == {"base", "scan", "masks", "all", "lora_matched"}
    for arm in arms.values():
        assert arm["eval_loss"]["n"] == 2 and 0 < arm["eval_loss"]["mean"] < 20
    # the frozen-base arms train far fewer parameters than full fine-tuning (base)
    assert arms["all"]["trainable_params"]["mean"] < arms["base"]["trainable_params"]["mean"]
    matched = [r for r in result["runs"] if r["arm"] == "lora_matched"]
    assert all(isinstance(r["overrides"]["peft.lora_r"], int) and r["notes"]["matched_budget"] > 0 for r in matched)
    assert {"finetune/masks", "finetune/all_vs_base", "finetune/scan_alone", "finetune/all_vs_lora_matched"} <= \
        set(result["effects"])
    assert {c["claim"] for c in result["claims"]} >= {"85-95% fewer trainable parameters", "30-70% sparsity"}
    report = (out / "RESEARCH_REPORT.md").read_text()
    assert "## Claims" in report and "## Effects (finetune)" in report
    for name in ("efficiency_surface", "loss_curves", "hyperparameter_impact", "sparsity_importance_heatmaps",
                 "allocation_over_time"):
        path = out / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            img.verify()


def test_report_follows_the_result_files(study: dict) -> None:
    out = study["out"]
    before = json.loads((out / "comprehensive_results.json").read_text())
    path = out / "runs" / "finetune-masks-s1" / "result.json"
    original = path.read_text()
    data = json.loads(original)
    data["eval_loss"] += 1.0
    path.write_text(json.dumps(data))
    from launch.study import main

    try:
        assert main(study["cmd"][2:] + ["--report-only"]) == 0        # in this process: no second start-up
        after = json.loads((out / "comprehensive_results.json").read_text())
    finally:
        path.write_text(original)
    mean = lambda r: r["arms"]["finetune"]["masks"]["eval_loss"]["mean"]  # noqa: E731
    assert mean(after) == pytest.approx(mean(before) + 0.5)
    effect = lambda r: r["effects"]["finetune/masks"]["metrics"]["eval_loss"]["mean"]  # noqa: E731
    assert effect(after) == pytest.approx(effect(before) + 0.5)
