"""The software and machine a run ran on, written into every ``summary.json`` and profile report.

A zeroth-order run is steered by differences of two nearly equal losses, so the last digits of its forwards
steer where it ends, and those digits depend on the CPU's kernels (torch picks AVX2, AVX-512 or AMX code at
run time), torch's thread count and the package versions: the default run, same code and seed, reads 0.692
with one thread and 0.694 with two on one machine (docs/results.md, "Reproducibility"). This is the record
of all three, for comparing a result only with those run alike.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

import torch

#: The packages whose versions can move a run's numbers (the forward, the quantized weights, the adapter files).
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "numpy", "onnxruntime", "onnxruntime-gpu")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Each package's installed version (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict:
    """Python, platform, CPU count, the instruction set torch's CPU kernels use (``AVX2``, ``AVX512``, ...),
    torch's intra-op thread count and the package versions of this process."""
    return {"zoact_edge": package_versions(("zoact-edge",))["zoact-edge"], "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "packages": package_versions()}
