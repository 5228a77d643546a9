"""slurm/train.sh without a cluster: lint, guard rails, and the dry run for faked Slurm allocations.

The dry run must print exactly what a real job would launch; the per-task helper slurm/rank_env.sh
must turn Slurm's task variables into torch.distributed's. Hostlists are checked against Slurm's own
parser (`scontrol show hostnames`) when Slurm is installed.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "slurm" / "train.sh"
RANK_ENV = REPO / "slurm" / "rank_env.sh"
SCRIPTS = [TRAIN_SH, RANK_ENV, REPO / ".ci" / "install_slurm.sh"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any Slurm or launcher variables, plus `extra`."""
    drop = ("SLURM_", "SBATCH_", "SRUN_", "TRAIN_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                   "LOCAL_RANK", "OMP_NUM_THREADS")}
    env.update(extra)
    return env


def fake_allocation(nodes: str, num_nodes: int, tasks_per_node: str, ntasks: int, job_id: int = 1234,
                    **extra: str) -> dict[str, str]:
    """The variables Slurm sets in a batch job's environment, for an allocation described by the arguments."""
    return clean_env(SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="am", SLURM_JOB_NODELIST=nodes,
                     SLURM_JOB_NUM_NODES=str(num_nodes), SLURM_NNODES=str(num_nodes), SLURM_NTASKS=str(ntasks),
                     SLURM_TASKS_PER_NODE=tasks_per_node, SLURM_SUBMIT_DIR=str(REPO), **extra)


def run_script(args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TRAIN_SH), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def dry_run(env: dict[str, str], *args: str) -> tuple[dict[str, str], list[str]]:
    """Run the dry run; return the exported rendezvous variables and the srun argv it prints."""
    result = run_script(["--dry-run", *args], env)
    assert result.returncode == 0, result.stderr
    exports = next(line for line in result.stdout.splitlines() if line.startswith("export "))
    srun = next(line for line in result.stdout.splitlines() if line.startswith("srun "))
    return dict(kv.split("=", 1) for kv in exports.split()[1:]), shlex.split(srun)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 10\n")
    return path


# ------------------------------------------------------------------------------------------ lint
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_shellcheck_clean(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/install_slurm.sh installs it)")
    lint = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True,
                          check=False)
    assert lint.returncode == 0, lint.stdout


def test_no_cluster_specific_names_in_the_script() -> None:
    text = TRAIN_SH.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert not [d for d in directives if d.split()[1].startswith(("--partition", "-p", "--account", "-A",
                                                                  "--qos", "--constraint", "--nodelist"))]
    assert not re.search(r"\bn[12]\b|localhost|127\.0\.0\.1", text), "no test-cluster names in the script"


# ---------------------------------------------------------------------------------- guard rails
def test_outside_slurm_fails_with_a_clear_error(config_file: Path) -> None:
    result = run_script(["--config", str(config_file)], clean_env())
    assert result.returncode == 2
    assert "not inside a Slurm job" in result.stderr
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS"):
        assert var in result.stderr
    assert "sbatch" in result.stderr and result.stdout == ""


def test_partial_slurm_environment_names_what_is_missing(config_file: Path) -> None:
    env = clean_env(SLURM_JOB_ID="7", SLURM_NTASKS="2")
    result = run_script(["--config", str(config_file)], env)
    assert result.returncode == 2
    missing = result.stderr.split("not inside a Slurm job:")[1].split("not set")[0].split()
    assert missing == ["SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_TASKS_PER_NODE"]


def test_gpu_count_must_match_ranks_per_node(config_file: Path) -> None:
    env = fake_allocation("gpu[01-04]", 4, "4(x4)", 16, SLURM_GPUS_ON_NODE="8")
    result = run_script(["--dry-run", "--config", str(config_file)], env)
    assert result.returncode == 2
    assert "--ntasks-per-node=8 --gpus-per-node=8" in result.stderr


def test_missing_default_config_is_named(tmp_path: Path) -> None:
    env = fake_allocation("n1", 1, "1", 1, TRAIN_CONFIG=str(tmp_path / "absent.yaml"))
    result = run_script(["--dry-run"], env)
    assert result.returncode == 2
    assert f"config {tmp_path / 'absent.yaml'} not found" in result.stderr


# --------------------------------------------------------------------------------------- dry run
def test_dry_run_for_4_nodes_x_8_gpus(tmp_path: Path, config_file: Path) -> None:
    env = fake_allocation("gpu-a[07-10]", 4, "8(x4)", 32, job_id=4242, SLURM_GPUS_ON_NODE="8",
                          SLURM_CPUS_ON_NODE="96", TRAIN_LOG_DIR=str(tmp_path / "logs"))
    exports, argv = dry_run(env, "--config", str(config_file), "train.max_steps=500", "logging.run_name=big run")
    assert exports == {"MASTER_ADDR": "gpu-a07", "MASTER_PORT": str(10000 + 4242 % 20000), "WORLD_SIZE": "32",
                       "OMP_NUM_THREADS": "12"}
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else "python3"
    assert argv == [
        "srun", "--nodes=4", "--ntasks=32", "--kill-on-bad-exit=0", "--wait=120", "--open-mode=append",
        f"--output={tmp_path / 'logs'}/am-4242/rank-%t.log",
        str(RANK_ENV), python, str(REPO / "launch" / "train.py"),
        "--config", str(config_file), "train.max_steps=500", "logging.run_name=big run", "train.resume=auto"]
    assert not (tmp_path / "logs").exists(), "a dry run must not create anything"


def test_dry_run_defaults_and_knobs(tmp_path: Path) -> None:
    setup = tmp_path / "setup.sh"
    setup.write_text(f"touch {tmp_path / 'sourced'}\n")
    env = fake_allocation("cpu[1-2]", 2, "1(x2)", 2, SLURM_CPUS_PER_TASK="6", TRAIN_PYTHON="/opt/py/bin/python",
                          TRAIN_SRUN_ARGS="--container-image=img.sqsh --container-mounts=/data:/data",
                          MASTER_PORT="29500", TRAIN_EXIT_WAIT="30", TRAIN_SETUP=str(setup))
    exports, argv = dry_run(env, "train.resume=none", "train.seed=3")
    assert not (tmp_path / "sourced").exists(), "a dry run must not source TRAIN_SETUP"
    assert exports["MASTER_PORT"] == "29500" and exports["OMP_NUM_THREADS"] == "6"
    assert argv[:9] == ["srun", "--nodes=2", "--ntasks=2", "--kill-on-bad-exit=0", "--wait=30",
                        "--open-mode=append", f"--output={REPO}/runs/slurm/am-1234/rank-%t.log",
                        "--cpus-per-task=6", "--container-image=img.sqsh"]
    assert argv[9:] == ["--container-mounts=/data:/data", str(RANK_ENV), "/opt/py/bin/python",
                        str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
                        "train.resume=none", "train.seed=3"]   # the user's train.resume= wins: none added


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm is not installed (.ci/install_slurm.sh)")
@pytest.mark.parametrize("nodelist", ["node17", "gpu[07-10,12],cpu3", "rack[1-2]-node[01-04]", "a[1,3-4]b[5-6],c",
                                      "n-[003-005]", "x1,x2"])
def test_master_addr_is_slurms_first_host(tmp_path: Path, config_file: Path, nodelist: str) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=parse\nSlurmctldHost=localhost\nNodeName=x\nPartitionName=p Nodes=x\n")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=clean_env(SLURM_CONF=str(conf)),
                           capture_output=True, text=True, check=True, timeout=30).stdout.split()
    env = fake_allocation(nodelist, len(hosts), f"1(x{len(hosts)})", len(hosts))
    exports, _ = dry_run(env, "--config", str(config_file))
    assert exports["MASTER_ADDR"] == hosts[0]


# ------------------------------------------------------------------------------------ per task
def test_rank_env_maps_slurm_task_variables() -> None:
    env = clean_env(SLURM_PROCID="13", SLURM_NTASKS="32", SLURM_LOCALID="5", SLURM_NODEID="1",
                    MASTER_ADDR="gpu01", MASTER_PORT="11234", TRAIN_TASKS_PER_NODE="8 8 8 8")
    out = subprocess.run([str(RANK_ENV), "env"], env=env, capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "13", "WORLD_SIZE": "32", "LOCAL_RANK": "5", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu01", "MASTER_PORT": "11234"}


def test_rank_env_uneven_nodes_and_missing_variables() -> None:
    env = clean_env(SLURM_PROCID="2", SLURM_NTASKS="3", SLURM_LOCALID="0", SLURM_NODEID="1",
                    MASTER_ADDR="a", MASTER_PORT="1", TRAIN_TASKS_PER_NODE="2 1")
    out = subprocess.run([str(RANK_ENV), "printenv", "LOCAL_WORLD_SIZE"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1"
    del env["SLURM_PROCID"]
    result = subprocess.run([str(RANK_ENV), "true"], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "SLURM_PROCID is not set" in result.stderr
