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

_peak_before_reset = 0  # lifetime peak saved by reset_peak_rss (the reset also lowers ru_maxrss on Linux)


def peak_rss_bytes() -> int:
    """The process's lifetime peak RSS, phase resets (:func:`reset_peak_rss`) notwithstanding."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak if sys.platform == "darwin" else peak * 1024, _peak_before_reset)  # Linux reports KiB


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
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``) and cached CUDA blocks to the device.

    glibc keeps freed tensor memory in its arenas, so after a phase with a different allocation
    pattern (the basis passes, an evaluation) RSS stays hundreds of MB above what is in use. We
    call this between phases, not per step: per-step trimming (or a low mmap threshold) costs up to
    70% step time on CPU for this workload.

    On CUDA the caching allocator keeps freed blocks the same way; ``empty_cache`` hands them back.
    Between the basis passes and the steps that lowered ZO-Act's peak on an H200 (1.1 B Llama shape,
    4-bit, batch 8 x 256) from 1324 to 1280 MiB (docs/results/gpu-h200, runs 2 and 3).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- phase peaks
# A process's lifetime peak (ru_maxrss) mixes phases: loading a checkpoint can peak higher than
# the step we want to measure. Linux lets a process reset its own high-water mark (VmHWM) by
# writing "5" to /proc/self/clear_refs, so a phase's peak can be read on its own.


def current_rss_bytes() -> int:
    """Resident set size right now (Linux: /proc; elsewhere: the lifetime peak, the best we have)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Start a new RSS high-water mark; False where the OS does not allow it (then peaks are lifetime peaks)."""
    global _peak_before_reset
    _peak_before_reset = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def phase_peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (Linux VmHWM), else the lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()
