"""Run one untrusted Python program inside throwaway Linux namespaces (executed as a script).

`sandbox.py` starts this file as `python -I -S _sandbox_launcher.py` (as root, stdlib only) and
writes one JSON header line followed by the program text to its stdin. The launcher then:

1. unshares mount, network, PID and IPC namespaces: no network (only a down loopback), no view of
   or signal to any process outside, and a private mount table;
2. covers the project, home directories and other private folders with empty read-only tmpfs
   mounts, and /tmp, /var/tmp, /dev/shm with fresh size-capped tmpfs (anything written there
   vanishes with the namespace); the interpreter's prefix is bound back read-only;
3. forks the program as PID 1 of the new PID namespace, in a fresh work dir, with rlimits (address
   space, CPU seconds, processes, file size, open files, no core dumps), privileges dropped to an
   unprivileged uid (so RLIMIT_NPROC is enforced and host files are read-only to it);
4. waits up to the wall-clock timeout, kills it otherwise; when the namespace's PID 1 exits the
   kernel kills every process left in it, so nothing survives.

It prints one JSON line: {"status": "ok" | "timeout" | "setup_error", "returncode", "output"}.
"""
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
OUTPUT_CAP = 8192

_libc = ctypes.CDLL(None, use_errno=True)


def _call(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(source, target, fstype, flags, data=None) -> None:
    _call(_libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data)),
          f"mount {target}")


def _isolate_filesystem(cfg: dict) -> None:
    """Private mount table: hide private folders, fresh scratch tmpfs, interpreter bound back."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["keep"]}
    flags = MS_NOSUID | MS_NODEV
    for path in cfg["hide"]:
        _mount("tmpfs", path, "tmpfs", flags, "size=1m,mode=0755")
    for path in cfg["scratch"]:
        _mount("tmpfs", path, "tmpfs", flags, f"size={cfg['tmp_mb']}m,mode=1777")
    covered = cfg["hide"] + cfg["scratch"]
    for path, fd in keep.items():
        if any(path == c or path.startswith(c.rstrip("/") + "/") for c in covered):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)


def _child(cfg: dict, program: str, err_w: int) -> None:
    """PID 1 of the new namespace: set up the work dir, limits and identity, then exec."""
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        uid = gid = cfg["uid"]
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        for name in (workdir, os.path.join(workdir, "program.py")):
            os.chown(name, uid, gid)
        out = os.open("/tmp/output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        mem = cfg["memory_mb"] * 2**20
        cpu = int(cfg["timeout"]) + 1
        limits = {
            resource.RLIMIT_AS: mem, resource.RLIMIT_DATA: mem, resource.RLIMIT_CPU: cpu,
            resource.RLIMIT_NPROC: cfg["max_processes"], resource.RLIMIT_FSIZE: 16 * 2**20,
            resource.RLIMIT_NOFILE: 64, resource.RLIMIT_CORE: 0,
        }
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        # Set after setuid: the kernel clears the parent-death signal when credentials change.
        _call(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        os.chdir(workdir)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "TMPDIR": workdir}
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", "program.py"], env)
    except BaseException as exc:  # noqa: BLE001 - any failure before exec is a setup error, reported via the pipe
        os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
        os._exit(125)


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    program = sys.stdin.read()
    try:
        _call(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
        _isolate_filesystem(cfg)
    except OSError as exc:
        print(json.dumps({"status": "setup_error", "returncode": None, "output": str(exc)}))
        return
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _child(cfg, program, err_w)
    os.close(err_w)
    pidfd = os.pidfd_open(pid)
    deadline = time.monotonic() + cfg["timeout"]
    timed_out = not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]
    if timed_out:
        os.kill(pid, signal.SIGKILL)  # PID 1 of the namespace: the kernel kills all the rest
    _, status = os.waitpid(pid, 0)
    setup_error = os.read(err_r, 4096).decode(errors="replace")
    if setup_error:
        print(json.dumps({"status": "setup_error", "returncode": None, "output": setup_error}))
        return
    try:
        with open("/tmp/output.txt", "rb") as f:
            output = f.read(OUTPUT_CAP).decode(errors="replace")
    except OSError:
        output = ""
    print(json.dumps({"status": "timeout" if timed_out else "ok",
                      "returncode": os.waitstatus_to_exitcode(status), "output": output}))


if __name__ == "__main__":
    main()
