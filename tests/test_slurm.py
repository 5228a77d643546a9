"""`sbatch slurm/train.sh` on a real local Slurm cluster (two slurmd nodes, see tests/slurm_cluster.py).

Two jobs of the same tiny run (2 ranks, one per node, every pillar on) are submitted together: a
reference that runs uninterrupted, and one that gets `scancel --signal=USR1` mid-training, saves,
requeues itself and resumes (`train.resume=auto`). The reference must finish with a checkpoint, a W&B
offline run and rank-consistent pillar decisions; the preempted job must end with exactly the
reference's loss curve and parameters.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)
from test_train_runs import data_dir  # noqa: F401  (module fixture: the shared stdlib shards)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
PREEMPT_AFTER_STEP = 5      # signal once the preempted job has logged this many optimizer steps
JOB_TIMEOUT_S = 300          # both jobs, start to finish (about 100 s on 2 busy cores)

RUN_CONFIG = f"""\
# A tiny run that exercises every pillar: scan-order refreshes (pillar 1) every 2 steps, learned
# structured masks (pillar 2) throughout, LoRA/IA3 reallocation (pillar 3) every 4 steps.
model: {{d_model: 32, n_layer: 2}}
train: {{seq_len: 64, batch_size: 1, max_steps: {MAX_STEPS}, seed: 7, zero_stage: 2, save_every: 0, export_at_end: true}}
optim: {{lr: 0.003}}
scan_order: {{enabled: true, every: 2}}
masks: {{enabled: true, block_size: 8}}
peft: {{enabled: true, lora_r: 4, every: 4}}
eval: {{batches: 1}}
logging: {{wandb: true, wandb_mode: offline, progress_bar: false}}
"""


@dataclass
class SlurmRun:
    job_id: int
    name: str
    output_dir: Path
    batch_log: Path
    rank_logs: Path
    record: dict[str, str]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(output_dir: Path) -> list[dict]:
    return read_jsonl(output_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def token_data(data_dir: Path) -> Path:  # noqa: F811
    """The token shards every training test reads (this Python's standard library, SentencePiece 512), built once
    per checkout instead of once more here (a data_prep run, ~8 s)."""
    return data_dir


@pytest.fixture(scope="module")
def slurm_runs(slurm_cluster: SlurmCluster, token_data: Path,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, SlurmRun]:
    """Submit the reference and the preempted job together (they share the two nodes), preempt the second
    one mid-training, and wait for both to finish."""
    work = tmp_path_factory.mktemp("slurm-jobs")
    config = work / "tiny.yaml"
    config.write_text(RUN_CONFIG + f"data: {{dir: {token_data}}}\n")
    env = {**os.environ, "TRAIN_LOG_DIR": str(work / "logs"), "WANDB_MODE": "offline", "TRAIN_PYTHON": sys.executable,
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}

    def submit(name: str) -> SlurmRun:
        job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", f"--job-name={name}",
                                      f"--chdir={work}", f"--output={work}/%x-%j.out", "--time=10",
                                      str(REPO / "slurm" / "train.sh"), "--config", str(config),
                                      f"train.output_dir={work / name}", env=env, cwd=REPO)
        return SlurmRun(job_id, name, work / name, work / f"{name}-{job_id}.out",
                        work / "logs" / f"{name}-{job_id}", {})

    reference, preempted = submit("reference"), submit("preempted")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(read_metrics(preempted.output_dir)) < PREEMPT_AFTER_STEP:
        record = slurm_cluster.job(preempted.job_id)
        assert record["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), (record, _logs(preempted))
        assert time.monotonic() < deadline, f"no training progress in {JOB_TIMEOUT_S} s: {_logs(preempted)}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", str(preempted.job_id))
    for run in (reference, preempted):
        run.record = slurm_cluster.wait_until_finished(run.job_id, timeout=max(10, deadline - time.monotonic()))
    return {"reference": reference, "preempted": preempted}


def _logs(run: SlurmRun) -> str:
    """The batch log and every rank log of a job (for assertion messages)."""
    parts = [p for p in [run.batch_log, *sorted(run.rank_logs.glob("rank-*.log"))] if p.is_file()]
    return "\n".join(f"===== {p}\n{p.read_text()[-4000:]}" for p in parts)


def _checkpoint(output_dir: Path) -> Path:
    root = output_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def test_cluster_runs_one_task_on_each_node(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %T %c").stdout.split("\n")
    assert [line.split() for line in nodes if line] == [["n1", "idle", "2"], ["n2", "idle", "2"]]
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", f"--chdir={tmp_path}",
                                  f"--output={tmp_path}/out", "--wrap",
                                  "srun bash -c 'echo $SLURM_PROCID $SLURMD_NODENAME'")
    record = slurm_cluster.wait_until_finished(job_id, timeout=60)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0")
    assert sorted((tmp_path / "out").read_text().split("\n")) == ["", "0 n1", "1 n2"]


def test_two_node_job_trains_with_all_pillars(slurm_runs: dict[str, SlurmRun]) -> None:
    run = slurm_runs["reference"]
    assert (run.record["JobState"], run.record["ExitCode"]) == ("COMPLETED", "0:0"), _logs(run)
    assert run.record["NumNodes"] == "2" and run.record["NodeList"] == "n[1-2]"
    assert run.record["Restarts"] == "0"
    assert "training finished" in run.batch_log.read_text()
    assert sorted(p.name for p in run.rank_logs.glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]

    summary = json.loads((run.output_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and "2 rank(s)" in summary["text"]
    assert [m["step"] for m in read_metrics(run.output_dir)] == list(range(1, MAX_STEPS + 1))

    checkpoint = _checkpoint(run.output_dir)
    assert checkpoint.name == f"step_{MAX_STEPS:08d}" and (checkpoint / "MANIFEST.json").is_file()
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    assert trainer["world_size"] == 2
    decisions = trainer["pillars"]
    assert len(decisions["scan_decisions"]) == (MAX_STEPS - 1) // 2          # a refresh every 2 steps
    assert [a["step"] for a in decisions["allocation_history"]] == list(range(4, MAX_STEPS, 4))
    assert (run.output_dir / "export" / "merged").is_dir()

    # Ranks agree: after every pillar decision and at the end, each rank digests its gathered parameters,
    # its scan order and its allocation (consistency.jsonl); both ranks' digests must be identical.
    checks = read_jsonl(run.output_dir / "consistency.jsonl")
    assert all(len(c["digests"]) == 2 and c["digests"][0] == c["digests"][1] for c in checks), checks
    tags = [c["tag"] for c in checks]
    assert any("scan_order" in t for t in tags) and any("allocation" in t for t in tags) and tags[-1] == "end"

    run_id = (run.output_dir / "wandb_run_id.txt").read_text().strip()
    wandb_runs = list((run.output_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert wandb_runs and list(wandb_runs[0].glob("run-*.wandb")), "no W&B offline run was written"


def test_preempted_job_requeues_resumes_and_matches_uninterrupted_run(slurm_runs: dict[str, SlurmRun]) -> None:
    reference, run = slurm_runs["reference"], slurm_runs["preempted"]
    assert (run.record["JobState"], run.record["ExitCode"]) == ("COMPLETED", "0:0"), _logs(run)
    assert run.record["Restarts"] == "1", _logs(run)
    batch_log = run.batch_log.read_text()
    assert "requeueing job" in batch_log and batch_log.count("attempt ") == 2, batch_log
    rank0 = (run.rank_logs / "rank-0.log").read_text()
    preempted_at = int(rank0.split("preempted at step ")[1].split(":")[0])
    assert PREEMPT_AFTER_STEP <= preempted_at < MAX_STEPS
    assert f"at step {preempted_at}" in rank0.split("preempted at step ")[1].split("resumed from ")[1].splitlines()[0]

    # The loss curve of the interrupted job, stitched across the restart, equals the uninterrupted one.
    curve = [(m["step"], m["loss"], m["ce"], m["lr"]) for m in read_metrics(run.output_dir)]
    expected = [(m["step"], m["loss"], m["ce"], m["lr"]) for m in read_metrics(reference.output_dir)]
    assert len(curve) == MAX_STEPS and curve == expected

    # And so do the final parameters (every tensor of the engine's module, bit for bit).
    def module_state(output_dir: Path) -> dict[str, torch.Tensor]:
        path = _checkpoint(output_dir) / "engine" / "state" / "mp_rank_00_model_states.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["module"]

    final, expected_final = module_state(run.output_dir), module_state(reference.output_dir)
    assert final.keys() == expected_final.keys()
    different = [k for k in final if not torch.equal(final[k], expected_final[k])]
    assert not different, f"parameters differ after resume: {different}"
    # The pillars' state too: the same decisions, and the same cumulative scan order recorded in the model.
    decisions = [json.loads((_checkpoint(r.output_dir) / "trainer.json").read_text())["pillars"]
                 for r in (run, reference)]
    assert decisions[0] == decisions[1]
    orders = [json.loads((r.output_dir / "export" / "merged" / "config.json").read_text())["extra"]["scan_order"]
              for r in (run, reference)]
    assert orders[0] == orders[1], "the scan order recorded in the exported model differs after the resume"
    end_digests = [read_jsonl(r.output_dir / "consistency.jsonl")[-1] for r in (run, reference)]
    assert end_digests[0]["tag"] == "end" and end_digests[0] == end_digests[1]

    # One W&B run continued across the restart (same id in both attempts' offline directories).
    run_id = (run.output_dir / "wandb_run_id.txt").read_text().strip()
    assert len(list((run.output_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_scancel_sigterm_with_wandb_saves_a_complete_checkpoint(slurm_cluster: SlurmCluster, token_data: Path,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """`scancel JOB` sends SIGTERM to every process of the job, W&B's service included (KillWait=30 s later,
    SIGKILL): the ranks still save a complete checkpoint, and the exit records give 99."""
    from adaptive_mamba.training.checkpointing import latest_checkpoint, verify_checkpoint

    config = tmp_path / "tiny.yaml"
    config.write_text(RUN_CONFIG.replace(f"max_steps: {MAX_STEPS}", "max_steps: 200") + f"data: {{dir: {token_data}}}\n")
    out = tmp_path / "cancelled"
    env = {**os.environ, "TRAIN_LOG_DIR": str(tmp_path / "logs"), "WANDB_MODE": "offline", "TRAIN_PYTHON": sys.executable,
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--job-name=cancelled", f"--chdir={tmp_path}",
                                  f"--output={tmp_path}/%x-%j.out", "--time=10", str(REPO / "slurm" / "train.sh"),
                                  "--config", str(config), f"train.output_dir={out}", env=env, cwd=REPO)
    run = SlurmRun(job_id, "cancelled", out, tmp_path / f"cancelled-{job_id}.out", tmp_path / "logs" / f"cancelled-{job_id}",
                   {})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(read_metrics(out)) < 3:
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), _logs(run)
        assert time.monotonic() < deadline, f"no training progress in {JOB_TIMEOUT_S} s: {_logs(run)}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", str(job_id))
    run.record = slurm_cluster.wait_until_finished(job_id, timeout=120)
    assert run.record["JobState"] == "CANCELLED", run.record
    rank0 = (run.rank_logs / "rank-0.log").read_text()
    assert "preempted at step" in rank0, _logs(run)
    # Every rank recorded 99 (the batch shell itself may be SIGKILLed after KillWait before it reports).
    records = sorted(json.loads(p.read_text())["code"] for p in (run.rank_logs / "exit-attempt-1").glob("rank_*.json"))
    assert records == [99, 99], _logs(run)
    checkpoint = latest_checkpoint(out)
    state = verify_checkpoint(checkpoint)                 # complete: every file matches its manifest
    assert state["step"] == max(m["step"] for m in read_metrics(out)) >= 3
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def test_bad_input_exits_2_under_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    """The exit contract under srun: a bad value is exit 2 of the job (the ranks' records), not 1."""
    env = {**os.environ, "TRAIN_LOG_DIR": str(tmp_path / "logs"), "TRAIN_PYTHON": sys.executable}
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--job-name=bad", f"--chdir={tmp_path}",
                                  f"--output={tmp_path}/%x-%j.out", str(REPO / "slurm" / "train.sh"),
                                  "data.source=stdlib", f"train.output_dir={tmp_path / 'out'}", "peft.lora_r=0", env=env, cwd=REPO)
    record = slurm_cluster.wait_until_finished(job_id, timeout=180)
    batch_log = (tmp_path / f"bad-{job_id}.out").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "2:0"), (record, batch_log)
    assert "training failed with exit status 2" in batch_log
    records = [json.loads(p.read_text()) for p in (tmp_path / "logs" / f"bad-{job_id}" / "exit-attempt-1").glob("*.json")]
    assert sorted(r["code"] for r in records) == [2, 2]
    assert "peft.lora_r=0 is invalid: it must be >= 1" in records[0]["message"]
