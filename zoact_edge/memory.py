"""Peak memory as the OS and the CUDA allocator see it.

On CPU torch keeps no allocator statistics, so the honest figure is the process's peak resident
set size (what the OS would have to find in RAM). On CUDA we report torch's peak allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_cuda_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    glibc keeps freed tensor memory in its arenas, so after a phase with a different allocation
    pattern (the basis passes, an evaluation) RSS stays hundreds of MB above what is in use. We
    call this between phases, not per step: per-step trimming (or a low mmap threshold) costs up to
    70% step time on CPU for this workload.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
