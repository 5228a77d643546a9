"""Execute untrusted generated programs (HumanEval completions) safely, without root.

Each program runs under bubblewrap (`bwrap`, Debian package `bubblewrap`) in fresh user, mount,
PID, network, IPC, UTS and cgroup namespaces, which any unprivileged user may create:

* the file system is an empty tmpfs with only /usr and the interpreter's prefix bound read-only:
  the project, home folders and everything else are not there at all;
* /tmp, /var/tmp, /dev/shm and /run/lock are fresh size-capped tmpfs (gone with the sandbox);
* no network (an own, empty network namespace), no view of or signal to outside processes;
* rlimits (address space, CPU seconds, processes, file size, open files, no core dumps) applied by
  `prlimit` inside the sandbox; wall-clock timeout; when the program's PID 1 ends or is killed,
  the kernel kills every process left in the namespace.

A program passes only if it exits 0 AND hands back a random per-run token after it ran to the end:
the token is read from a pipe by a small driver before the untrusted code starts, is never in the
program text or environment, and is written to a second pipe only after the code returned. So
`sys.exit(0)`, `raise SystemExit(0)`, `os._exit(0)` or an `atexit` hook before the tests finish
all fail. A guard inside the program additionally disables the obvious destructive functions
(defence in depth; the isolation does not depend on it).
"""
from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Every sandboxed process carries this word and the launching process's pid in its command line
# (so tests can look for leftovers of their own runs).
MARKER = "adaptive_mamba_sandbox"
OUTPUT_CAP = 8192  # characters of output kept per program (the tail: where tracebacks are)
UNAVAILABLE_HINT = ("install bubblewrap (`apt-get install -y bubblewrap`) and allow unprivileged "
                    "user namespaces (sysctl kernel.unprivileged_userns_clone=1), or leave out "
                    "the humaneval task")

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

# Runs inside the sandbox (stdlib only): argv = MARKER, token fd, proof fd, guard source.
DRIVER = '''\
import os, sys
def _run():
    token_fd, proof_fd, guard = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    token = os.read(token_fd, 64)
    os.close(token_fd)
    write = os.write
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    if guard:
        exec(guard, {"__name__": "_guard"})
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
    write(proof_fd, token)
_run()
'''


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the program under test)."""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: passed means it ran to its end and exited 0 within the limits."""

    passed: bool
    status: str  # "passed", "failed" or "timeout"
    returncode: int | None
    output: str


def _reachable(path: str) -> bool:
    """Executable by the sandbox's user: the current one, or `nobody` when we are root."""
    if os.geteuid() != 0:
        return os.access(path, os.X_OK)
    parts = Path(path).parents
    return (os.path.isfile(path) and os.stat(path).st_mode & 0o001 != 0
            and all(os.stat(p).st_mode & 0o001 for p in parts))


def _interpreter() -> tuple[str, str]:
    """(python executable, its prefix) reachable by the sandbox's user, to bind into the sandbox."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, Path(sys.base_prefix) / "bin" / version, f"/usr/bin/{version}",
                "/usr/bin/python3"):
        exe = os.path.realpath(exe)
        if _reachable(exe):
            return exe, str(Path(exe).parents[1])
    raise SandboxError(f"no {version} interpreter the sandbox can run; {UNAVAILABLE_HINT}")


def _bwrap_command(python: str, prefix: str, program_fd: int, token_fd: int, proof_fd: int,
                   timeout: float, memory_mb: int, max_processes: int, guard: bool,
                   tmp_mb: int = 64) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError(f"bubblewrap (`bwrap`) is not installed; {UNAVAILABLE_HINT}")
    # As root, drop to `nobody` first: root's processes are exempt from RLIMIT_NPROC, and
    # bubblewrap needs no privileges anyway.
    drop = (["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else [])
    cmd = [*drop, bwrap, "--unshare-all", "--die-with-parent", "--new-session",
           "--uid", "65534", "--gid", "65534", "--hostname", "sandbox",
           "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{link}"):
            cmd += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    if not prefix.startswith("/usr/") and prefix != "/usr":
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    for scratch in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        cmd += ["--size", str(tmp_mb * 2**20), "--perms", "1777", "--tmpfs", scratch]
    cmd += ["--dir", "/tmp/work", "--perms", "0444", "--file", str(program_fd), "/tmp/work/program.py",
            "--chdir", "/tmp/work", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", "/tmp/work", "--setenv", "TMPDIR", "/tmp/work",
            "--setenv", "LANG", "C.UTF-8",
            "prlimit", f"--as={memory_mb * 2**20}", f"--data={memory_mb * 2**20}",
            f"--cpu={int(timeout) + 1}", f"--nproc={max_processes}", f"--fsize={16 * 2**20}",
            "--nofile=64", "--core=0", "--",
            python, "-I", "-S", "-B", "-c", DRIVER, f"{MARKER}-{os.getpid()}", str(token_fd), str(proof_fd),
            GUARD if guard else ""]
    return cmd


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_until_closed(fd: int, wait: float = 5.0) -> bytes:
    """Read a pipe until every writer closed it (every sandbox process holds one end, so EOF
    means the sandbox is gone: bwrap may report the exit before the kernel killed the rest)."""
    data, deadline = b"", time.monotonic() + wait
    try:
        while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk[:1024 - len(data)]
    finally:
        os.close(fd)
    return data


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024,
                max_processes: int = 16, guard: bool = True) -> ExecutionResult:
    """Run one Python program in the sandbox; passed iff it runs to its end and exits 0 in time."""
    python, prefix = _interpreter()
    token = secrets.token_hex(16).encode()
    program_fd = _memfd("program.py", program.encode())
    token_r, token_w = os.pipe()
    proof_r, proof_w = os.pipe()
    os.write(token_w, token)
    os.close(token_w)
    cmd = _bwrap_command(python, prefix, program_fd, token_r, proof_w, timeout, memory_mb,
                         max_processes, guard)
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    pass_fds=(program_fd, token_r, proof_w), cwd="/",
                                    start_new_session=True, env={"PATH": "/usr/bin:/bin"})
        finally:
            for fd in (program_fd, token_r, proof_w):
                os.close(fd)
        timed_out = False
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # bwrap's --die-with-parent takes the sandbox down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out, returncode = True, None
        proof = _read_until_closed(proof_r)
        out.seek(0, os.SEEK_END)
        out.seek(max(0, out.tell() - 4 * OUTPUT_CAP))
        output = out.read().decode(errors="replace")[-OUTPUT_CAP:]
    if returncode not in (None, 0) and output.startswith(("bwrap:", "setpriv:")):
        raise SandboxError(f"could not set up the sandbox: {output.strip()}; {UNAVAILABLE_HINT}")
    if timed_out:
        return ExecutionResult(False, "timeout", None, output)
    passed = returncode == 0 and proof == token
    if returncode == 0 and not passed:
        output += "\n[sandbox] exited 0 before the program ran to its end: counted as failed\n"
    return ExecutionResult(passed, "passed" if passed else "failed", returncode, output)


@lru_cache(maxsize=None)
def _probe(uid: int) -> str | None:
    if sys.platform != "linux":
        return "the HumanEval sandbox needs Linux namespaces; run it on Linux"
    try:
        res = run_program("print('ok')\n", timeout=20.0)
    except SandboxError as exc:
        return str(exc)
    if not res.passed:
        return f"the sandbox does not run a trivial program ({res.output.strip()[-300:]}); {UNAVAILABLE_HINT}"
    return None


def check_isolation_available() -> None:
    """Raise SandboxError with the fix when this machine cannot run the sandbox (checked once)."""
    problem = _probe(os.geteuid())
    if problem is not None:
        raise SandboxError(problem)


def run_programs(programs: list[str], timeout: float = 3.0, memory_mb: int = 1024,
                 workers: int = 2, desc: str = "sandbox") -> list[ExecutionResult]:
    """Run many programs, `workers` at a time, each in its own sandbox."""
    check_isolation_available()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb),
                                  programs), total=len(programs), desc=desc))
