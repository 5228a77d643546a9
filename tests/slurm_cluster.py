"""A real single-machine Slurm cluster for tests: munged, slurmctld and two slurmd "nodes".

Everything lives under one temporary directory (its own munge key and socket, slurm.conf, state,
spool, logs) and uses free TCP ports, so it touches no system daemon or file and can run next to
another cluster. The daemons run in the foreground as children of the test process and are
stopped by `stop()` (scancel, `scontrol shutdown`, then signals) even when a test fails.
Settings follow ../shared/slurm/NOTES.md (Slurm 22.05 on Debian 12 without systemd).

Tests use the session fixture `slurm_cluster` (import it into the test module); it skips only when
the cluster truly cannot run here (not root, Slurm missing and no apt-get). `python
tests/slurm_cluster.py` starts a cluster by hand, prints how to reach it and waits for Ctrl-C.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / ".ci" / "install_slurm.sh"
NEEDED_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine (the reason says why)."""


def _which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_slurm_installed() -> None:
    """Install Slurm and munge from Debian packages (via .ci/install_slurm.sh) when missing."""
    if all(_which(p) for p in NEEDED_PROGRAMS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root: run `sudo .ci/install_slurm.sh`")
    if _which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and apt-get is missing: install slurmctld, slurmd, "
                               "slurm-client and munge with this system's package manager")
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], check=False, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{INSTALL_SCRIPT} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    missing = [p for p in NEEDED_PROGRAMS if _which(p) is None]
    if missing:
        raise RuntimeError(f"{INSTALL_SCRIPT} ran but {missing} are still missing")


def _free_ports(count: int) -> list[int]:
    """Ports that are free right now (bound once with port 0, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one `scontrol show -o` record (`Key=Value Key=Value ...`) into a dict.

    Values may contain spaces only for the few keys that end a record line (e.g. `Command=`),
    which do not matter here; every `Key=` token starts a new field.
    """
    fields: dict[str, str] = {}
    for match in re.finditer(r"(\S+?)=(\S*)", line):
        fields.setdefault(match.group(1), match.group(2))
    return fields


class SlurmCluster:
    """A running local Slurm cluster: one controller and `len(nodes)` slurmd processes."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 2,
                 real_memory_mb: int = 8000) -> None:
        self.root = Path(root)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.conf = self.root / "etc" / "slurm.conf"
        # munged insists that every directory above its socket is world-executable, which pytest's
        # private tmp dirs are not: the socket gets its own short-lived directory under /tmp.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="amslurm-munge-"))
        self._socket_dir.chmod(0o755)
        self.munge_socket = self._socket_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- environment for clients -------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, scontrol, ...): points them at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and v != "SLURM_CONF"]:
            del env[var]  # when the tests themselves run inside a Slurm job, don't leak its settings
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        env = kwargs.pop("env", None)
        result = subprocess.run(list(args), check=False, env=self.env(env), capture_output=True, text=True,
                                timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        """Write the configuration, start munged, slurmctld and the slurmd nodes, wait for idle."""
        ensure_slurm_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local Slurm cluster runs slurmd as root: run the Slurm tests as root")
        for sub in ("etc", "munge", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._start_munge()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self.wait_for_idle_nodes(timeout)

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN"
            for node, port in zip(self.nodes, node_ports))
        root = self.root
        self.conf.write_text(f"""\
# Local test cluster written by tests/slurm_cluster.py (see ../shared/slurm/NOTES.md).
ClusterName=amtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/spool/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
PlugStackConfig={root}/etc/plugstack.conf
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (root / "etc" / "plugstack.conf").write_text("")

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn("munged", [_which("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket}; see {self.log_dir / 'munged.out'}")
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.log_dir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                                 start_new_session=True)

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} during startup; "
                                   f"logs: {self.log_dir}/{name}.out and {self.log_dir}/*.log")

    def wait_for_idle_nodes(self, timeout: float) -> None:
        """Block until every node reports IDLE (slurmd registered with the controller)."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            result = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=15)
            if result.returncode == 0:
                states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
                if set(states) == set(self.nodes) and all(s == "idle" for s in states.values()):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout} s (states {states}); logs in {self.log_dir}")

    def stop(self) -> None:
        """Cancel every job (and wait for its processes to end), shut the daemons down, leave nothing behind."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self.run("scancel", "--full", "--user=root", check=False, timeout=15)
            deadline = time.monotonic() + 60      # KillWait is 30 s (time to save): SIGTERM, SIGKILL, the epilog
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False, timeout=15)
                if queue.returncode != 0 or not {"RUNNING", "COMPLETING", "CONFIGURING"} & set(queue.stdout.split()):
                    break
                time.sleep(0.5)
            self.run("scontrol", "shutdown", check=False, timeout=15)
        for name, proc in self._procs.items():
            if name == "munged":
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        munged = self._procs.get("munged")
        if munged is not None:
            munged.send_signal(signal.SIGTERM)
            try:
                munged.wait(timeout=10)
            except subprocess.TimeoutExpired:
                munged.kill()
                munged.wait()
        self._procs.clear()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:  # noqa: PYI034
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- jobs -------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit a batch job and return its id."""
        result = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """The controller's record of a job (`scontrol show job -o`), e.g. JobState, ExitCode, Restarts."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), timeout=15)
        return parse_scontrol_record(result.stdout)

    def wait_for_job(self, job_id: int, until: callable, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll the job record until `until(record)` is true; fail with the record on timeout."""
        deadline = time.monotonic() + timeout
        record = self.job(job_id)
        while not until(record):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in the expected state after {timeout} s: {record}")
            time.sleep(poll)
            record = self.job(job_id)
        return record

    def wait_until_finished(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait for a job to end (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) and return its record."""
        finished = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED"}
        return self.wait_for_job(job_id, lambda r: r.get("JobState") in finished, timeout)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running two-node cluster (n1, n2) for the whole test session; stopped at the end, even on failure."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        cluster.stop()
        pytest.skip(f"no local Slurm cluster: {err}")
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    with SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-cluster-"))) as cluster:
        print(f"cluster up: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
