"""Execute untrusted generated programs (HumanEval completions) safely.

Each program runs in its own process tree inside fresh Linux namespaces (see
`_sandbox_launcher.py`): no network, no view of other processes, the project and home folders
hidden, a fresh temporary work dir that disappears with the namespace, wall-clock + CPU + memory
+ process-count + file-size limits, and an unprivileged uid. A crashing, hanging or hostile
program is just a failed sample. A guard inside the program additionally disables the obvious
destructive functions (defence in depth; the isolation does not depend on it).
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# First uid of the unprivileged range used for sandboxed programs: one uid per concurrent worker,
# so RLIMIT_NPROC (counted per uid) of one sample never starves another.
SANDBOX_UID_BASE = 1_900_000

GUARD = '''\
def _sandbox_guard():
    """Disable process, file-deletion and network functions (defence in depth)."""
    import builtins, os, shutil, sys
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "posix_spawn",
                 "posix_spawnp", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
                 "replace", "truncate", "chmod", "chown", "lchown", "symlink", "link", "putenv",
                 "setuid", "setsid", "chdir", "chroot"):
        if hasattr(os, name):
            setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    for name in ("subprocess", "socket", "multiprocessing", "ctypes", "resource", "psutil"):
        sys.modules[name] = None
    builtins.exit = builtins.quit = None
_sandbox_guard()
del _sandbox_guard
'''


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the program under test)."""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: passed means it exited with status 0 within the limits."""

    passed: bool
    status: str  # "passed", "failed" or "timeout"
    returncode: int | None
    output: str


def _existing_top_level(paths: list[Path]) -> list[str]:
    """Real, existing paths, with those inside another listed path dropped (mount order)."""
    real = sorted({os.path.realpath(p) for p in paths if p.exists() and p.is_dir()})
    kept: list[str] = []
    for p in real:
        if p != "/" and not any(p == k or p.startswith(k + "/") for k in kept):
            kept.append(p)
    return kept


def _sandbox_config(timeout: float, memory_mb: int, max_processes: int, uid: int) -> dict:
    project = PROJECT_ROOT
    hide = [project, Path.cwd(), Path.home(), Path("/root"), Path("/home"), Path("/mnt"),
            Path("/media"), Path("/srv")]
    if project.parent != Path("/"):
        hide.append(project.parent)
    scratch = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/run/lock"), Path("/var/lock")]
    hide_paths = [p for p in _existing_top_level(hide)
                  if not any(p == s or p.startswith(s + "/") for s in map(str, scratch))]
    python = os.path.realpath(sys.executable)
    keep = _existing_top_level([Path(sys.base_prefix), Path(python).parent])
    return {"hide": hide_paths, "scratch": _existing_top_level(scratch), "keep": keep,
            "python": python, "timeout": timeout, "memory_mb": memory_mb,
            "max_processes": max_processes, "uid": uid, "tmp_mb": 64}


def check_isolation_available() -> None:
    """Raise SandboxError with the fix when this machine cannot run the sandbox."""
    if sys.platform != "linux":
        raise SandboxError("the HumanEval sandbox needs Linux namespaces; run it on Linux")
    if os.geteuid() != 0:
        raise SandboxError(
            "the HumanEval sandbox needs root (or CAP_SYS_ADMIN) to create mount/network/PID "
            "namespaces and drop to an unprivileged uid; run the suite as root inside a "
            "container, or leave out the humaneval task")


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024,
                max_processes: int = 16, uid: int = SANDBOX_UID_BASE,
                guard: bool = True) -> ExecutionResult:
    """Run one Python program in the sandbox; passed iff it exits with status 0 in time."""
    check_isolation_available()
    cfg = _sandbox_config(timeout, memory_mb, max_processes, uid)
    source = (GUARD + "\n" + program) if guard else program
    stdin = json.dumps(cfg) + "\n" + source
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    try:
        out, err = proc.communicate(stdin.encode(), timeout=timeout + 30)
    except subprocess.TimeoutExpired:  # the launcher itself hung: kill its whole process group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SandboxError(f"sandbox launcher did not return within {timeout + 30:.0f} s")
    try:
        report = json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SandboxError(f"sandbox launcher failed (exit {proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}") from None
    if report["status"] == "setup_error":
        raise SandboxError(f"could not set up the sandbox: {report['output']}")
    if report["status"] == "timeout":
        return ExecutionResult(False, "timeout", None, report["output"])
    passed = report["returncode"] == 0
    return ExecutionResult(passed, "passed" if passed else "failed", report["returncode"],
                           report["output"])


def run_programs(programs: list[str], timeout: float = 3.0, memory_mb: int = 1024,
                 workers: int = 2, desc: str = "sandbox") -> list[ExecutionResult]:
    """Run many programs, `workers` at a time, each under its own unprivileged uid."""
    check_isolation_available()
    uids: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        uids.put(SANDBOX_UID_BASE + slot)

    def one(program: str) -> ExecutionResult:
        uid = uids.get()
        try:
            return run_program(program, timeout=timeout, memory_mb=memory_mb, uid=uid)
        finally:
            uids.put(uid)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(one, programs), total=len(programs), desc=desc))
