"""`sbatch slurm/study.sh` on the local two-node Slurm cluster: one array job per wave, then the report."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


def test_study_runs_as_job_arrays_and_reports(slurm_cluster: SlurmCluster, shared_data: Path,  # noqa: F811
                                              tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "configs" / "study.yaml").read_text())
    spec["modes"] = {"pilot": {"seeds": 1, "regimes": ["finetune"], "grid_points": 0, "lr_sweep": [],
                               "pretrain_steps": 10, "corpus_mb": 0.2,
                               "train": {"model.d_model": 32, "model.n_layer": 1, "train.seq_len": 64,
                                         "train.batch_size": 2, "train.max_steps": 4, "eval.every": 2,
                                         "eval.batches": 1, "scan_order.every": 2, "peft.every": 2}}}
    spec["cells"] = {k: spec["cells"][k] for k in ("base", "all")}
    spec["controls"] = {"lora_matched": spec["controls"]["lora_matched"]}    # a second wave: needs `all`
    definition = tmp_path / "study.yaml"
    definition.write_text(yaml.safe_dump(spec))
    out, books = tmp_path / "out", shared_data / "books"
    env = {**os.environ, "STUDY_PYTHON": sys.executable, "STUDY_REPO": str(REPO), "STUDY_LOG_DIR": str(tmp_path),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    driver = slurm_cluster.sbatch(f"--chdir={tmp_path}", f"--output={tmp_path}/driver.out", "--time=20",
                                  str(REPO / "slurm" / "study.sh"), "--definition", str(definition), "--out", str(out),
                                  "--cache", str(tmp_path / "cache"), "--jobs", "1",
                                  "--pretrain-corpus", str(books / "austen_emma.txt"),
                                  "--finetune-corpus", str(books / "kjv_bible.txt"), env=env, cwd=REPO)
    record = slurm_cluster.wait_until_finished(driver, timeout=TIMEOUT_S)
    log = (tmp_path / "driver.out").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "wave 0: 2 runs in array job" in log and "wave 1: 1 runs in array job" in log, log
    report_job = int(log.split("report in job ")[1].split()[0])
    record = slurm_cluster.wait_until_finished(report_job, timeout=TIMEOUT_S)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.out")))
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), logs
    result = json.loads((out / "comprehensive_results.json").read_text())
    assert result["n_runs"] == 3 and not result["failed"], logs
    assert {r["arm"] for r in result["runs"]} == {"base", "all", "lora_matched"}
    # each run was one array task of its wave's job (one Slurm log per task)
    array_logs = sorted(p.name for p in tmp_path.glob("*-w*_*.out"))
    assert len(array_logs) == 3, array_logs
    assert (out / "RESEARCH_REPORT.md").is_file() and (out / "plots" / "loss_curves.png").is_file()
