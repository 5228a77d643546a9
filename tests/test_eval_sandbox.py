"""The HumanEval sandbox contains hostile programs.

Each hostile program reports success only by exiting 0 after its attack worked, so "failed" means
contained. Most attacks bypass the in-program guard (`guard=False`, or `posix`/`ctypes` calls) to
prove the OS-level isolation itself: the host file system is unchanged, no process outlives its
sample, and the suite finishes.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from adaptive_mamba.evaluation.sandbox import (
    MARKER,
    PROJECT_ROOT,
    SandboxError,
    check_isolation_available,
    run_program,
    run_programs,
)

# Programs that exit 0 before their tests finish: each must fail.
EXIT_ZERO = [
    "import sys\nsys.exit(0)\nassert False\n",
    "raise SystemExit(0)\nassert False\n",
    "import os\nos._exit(0)\nassert False\n",
    "import atexit, os\natexit.register(os._exit, 0)\nassert False\n",
]

try:
    check_isolation_available()
except SandboxError as exc:
    pytest.skip(f"sandbox unavailable here: {exc}", allow_module_level=True)


def sandbox_processes() -> list[int]:
    """PIDs of live processes of the sandboxes this process started (their command line carries
    MARKER and our pid)."""
    tag = f"{MARKER}-{os.getpid()}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if tag in cmdline.split(b"\0"):
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host file (outside any sandbox temp dir) that attacks try to change or delete."""
    path = tmp_path / "victim.txt"
    path.write_text("original\n")
    os.chmod(path, 0o666)  # even world-writable, it must stay untouched
    os.chmod(tmp_path, 0o777)
    return path


def assert_contained(result, victim: Path) -> None:
    assert not result.passed, result
    assert victim.read_text() == "original\n"
    assert sandbox_processes() == []


def test_well_behaved_program_passes_and_sees_only_its_temp_dir():
    res = run_program("import os\nassert os.getcwd() == '/tmp/work'\nassert os.getuid() != 0\n"
                      "assert os.listdir('/tmp/work') == ['program.py']\nprint('hi')\n")
    assert res.passed and res.output == "hi\n", res


def test_writing_outside_the_temp_dir(victim: Path):
    marker = PROJECT_ROOT / "sandbox_escape_marker.txt"
    prog = (f"open({str(victim)!r}, 'w').write('pwned')\n"
            f"open({str(marker)!r}, 'w').write('pwned')\n")
    assert_contained(run_program(prog, guard=False), victim)
    assert not marker.exists()


def test_deleting_files_outside_the_temp_dir(victim: Path):
    prog = f"import posix\nposix.unlink({str(victim)!r})\n"
    assert_contained(run_program(prog, guard=False), victim)
    prog = f"import os\nos.remove({str(victim)!r})\n"  # with the guard: the function is gone
    assert_contained(run_program(prog), victim)


def test_project_files_are_hidden():
    prog = f"print(open({str(PROJECT_ROOT / 'pyproject.toml')!r}).read())\n"
    res = run_program(prog, guard=False)
    assert not res.passed and "No such file" in res.output


@pytest.mark.parametrize("attack", [
    "import posix\nassert posix.system('echo pwned > {victim}') == 0\n",
    "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > {victim}'], check=True)\n",
    "import ctypes\nassert ctypes.CDLL(None).system(b'echo pwned > {victim}') == 0\n",
])
def test_shell_and_subprocess(victim: Path, attack: str):
    assert_contained(run_program(attack.format(victim=victim), guard=False), victim)


def test_os_system_with_guard_is_disabled(victim: Path):
    res = run_program(f"import os\nos.system('echo pwned > {victim}')\n")
    assert_contained(res, victim)
    assert "NoneType" in res.output


def test_background_daemon_does_not_survive():
    prog = ("import posix, time\n"
            "if posix.fork() == 0:\n"
            "    posix.setsid()\n"
            "    if posix.fork() == 0:\n"
            "        time.sleep(120)\n"
            "    posix._exit(0)\n"
            "time.sleep(0.2)\n")
    res = run_program(prog, guard=False)
    assert res.passed  # it exited 0, but its grandchild daemon must be gone
    assert sandbox_processes() == []


def test_process_limit_is_enforced_then_fork_bomb_is_contained(victim: Path):
    count = ("import posix, time\n"
             "n = 0\n"
             "for _ in range(200):\n"
             "    try:\n"
             "        pid = posix.fork()\n"
             "    except OSError:\n"
             "        break\n"
             "    if pid == 0:\n"
             "        time.sleep(30)\n"
             "        posix._exit(0)\n"
             "    n += 1\n"
             "print(n)\n")
    res = run_program(count, guard=False, max_processes=16)
    assert res.passed and 0 < int(res.output) < 16, res  # capped: safe to run a real fork bomb
    assert sandbox_processes() == []
    bomb = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    res = run_program(bomb, guard=False, timeout=2.0)
    assert res.status == "timeout"
    assert_contained(res, victim)


def test_infinite_loop_times_out():
    res = run_program("while True:\n    pass\n", timeout=1.0)
    assert res.status == "timeout" and res.returncode is None
    assert sandbox_processes() == []


def test_allocating_50_gb_fails():
    res = run_program("x = bytearray(50 * 2**30)\nprint(len(x))\n", guard=False)
    assert not res.passed and "MemoryError" in res.output


def test_socket_cannot_reach_the_host():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted: list = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    prog = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'pwned')\n")
    res = run_program(prog, guard=False)
    done.set()
    thread.join()
    server.close()
    assert not res.passed and accepted == []
    assert "Errno" in res.output  # unreachable / refused inside the empty network namespace


def test_suite_finishes_with_hostile_samples_mixed_in(victim: Path):
    hostile = [
        "while True:\n    pass\n",
        f"import posix\nposix.unlink({str(victim)!r})\n",
        "x = bytearray(50 * 2**30)\n",
        "import os\nos.kill(1, 9)\n",
        "import sys\nsys.exit(3)\n",
    ]
    results = run_programs(["assert sum([1, 1]) == 2\n", *hostile, *EXIT_ZERO], timeout=2.0, workers=2)
    assert [r.passed for r in results] == [True] + [False] * (len(hostile) + len(EXIT_ZERO))
    assert results[1].status == "timeout"
    assert victim.read_text() == "original\n"
    assert sandbox_processes() == []


def test_world_writable_folders_are_private():
    name = f"sandbox_marker_{os.getpid()}"
    targets = [Path(d) / name for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if Path(d).is_dir()]
    prog = "".join(f"open({str(t)!r}, 'w').write('x')\n" for t in targets)
    res = run_program(prog, guard=False)
    assert res.passed, res  # the writes work inside: each folder is a private tmpfs
    assert not any(t.exists() for t in targets)


@pytest.mark.parametrize("program", EXIT_ZERO)
def test_exiting_zero_before_the_end_fails(program: str):
    res = run_program(program, guard=False)
    assert res.returncode == 0 and not res.passed and res.status == "failed", res
    assert "before the program ran to its end" in res.output


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (and setpriv) to switch to an unprivileged user")
def test_everything_above_holds_for_an_unprivileged_user():
    """The whole module again as uid 65534 with no capabilities: bubblewrap needs no root."""
    basetemp = Path(tempfile.mkdtemp(prefix="sandbox_unprivileged_"))
    os.chmod(basetemp, 0o777)
    cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all",
           "--bounding-set=-all", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--basetemp", str(basetemp / "t"), __file__, "-k", "not unprivileged"]
    env = {**os.environ, "HOME": str(basetemp)}
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    finally:
        shutil.rmtree(basetemp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", proc.stdout) and "skipped" not in proc.stdout, proc.stdout[-2000:]
