"""Builds (once, cached by torch in TORCH_EXTENSIONS_DIR) and loads the C++ CPU selective-scan kernel.

The build happens on first use, never on import. If no C++ compiler is available the build fails once,
a warning says why, and callers fall back to the pure-torch scan.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"


# -march=native is safe because the build is per machine (JIT); the CPU capability is part of the extension
# name, so a cache shared between different CPUs never loads a mismatched binary. -fno-trapping-math and
# -fassociative-math let the N-wide state loop (polynomial exp, <h, C> reduction) vectorise: 5x faster here.
# -fopenmp makes at::parallel_for run on torch's intra-op threads.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
           "-fassociative-math", "-fno-signed-zeros"]
_LDFLAGS = ["-fopenmp"]


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _reuse_freed_memory() -> None:
    """Let glibc's malloc serve large blocks from its heap and keep freed ones for reuse (process-wide).

    By default a block over 32 MiB (an activation of a 8192-token step: (2, 8192, 1024) float32 is 64 MiB) is
    mmap'ed and unmapped when freed, so every such tensor of every step page-faults and zeroes its memory again:
    0.5-1.1 s of system time per step at 8192 tokens on one thread, none at 2048 (smaller blocks are reused).
    The peak footprint is unchanged; the process keeps its peak memory mapped instead of returning it to the OS.
    No-op outside glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


@functools.lru_cache(maxsize=None)
def _build() -> ModuleType | None:
    """The kernel module, or None when it cannot be built. Loading it also tunes malloc for the long-sequence
    tensors the CPU path allocates every step (`_reuse_freed_memory`)."""
    from torch.utils import cpp_extension

    _reuse_freed_memory()

    capability = torch.backends.cpu.get_cpu_capability().lower()
    try:
        return cpp_extension.load(name=f"adaptive_mamba_scan_cpu_{capability}", sources=[str(_SOURCE)],
                                  extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, verbose=False)
    except Exception as err:  # compiler missing or broken: degrade to the pure-torch scan
        warnings.warn(f"could not build the C++ selective-scan kernel ({type(err).__name__}: {err}); "
                      "falling back to the slower pure-torch scan. Install a C++ compiler (g++) to fix this.")
        return None


def available() -> bool:
    """True when the kernel is (or can be) built; triggers the one-time build."""
    return _build() is not None


def load() -> ModuleType:
    ext = _build()
    if ext is None:
        raise RuntimeError("the C++ selective-scan kernel is not available (see the earlier warning)")
    return ext
