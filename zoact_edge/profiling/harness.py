"""``zoact-edge profile``: peak memory of inference, ZO-Act, MeZO and backprop tuning, side by side.

Why subprocesses: a process never gives all freed memory back (allocator arenas, caches, a
model loaded by an earlier method), so measuring several methods in one process would let the
order decide the numbers. Each method therefore runs in its own fresh Python process on the same
model, inputs and loss, and reports:

* ``resident_bytes``: RSS after loading the model, one tiny warm-up forward (bitsandbytes repacks
  4-bit weights at the first inference call) and ``malloc_trim``: the starting line of every method;
* ``peak_bytes``: the method phase's peak RSS (the high-water mark is reset after setup, Linux
  ``/proc/self/clear_refs``), or on CUDA ``torch.cuda.max_memory_reserved``;
* a breakdown: runtime (interpreter, libraries), weights, adapter tensors, optimizer state,
  gradients (alive at the optimizer step), and activations + transients (what is left of the peak).

Every method gets the same environment, including any allocator variables set with
``--malloc-mmap-threshold``; the report records them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from ..config import PROFILE_METHODS as METHODS
from ..config import QUANTIZED_BITS, ProfileSpec
from ..environment import environment
from ..errors import UserError
from ..models import resolve_device

SCHEMA = "zoact-edge/memory-profile/1"


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {spec!r}: choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


# --------------------------------------------------------------------------- parent side


def not_applicable(method: str, bits: int) -> str | None:
    if method in ("mezo", "fo-full") and bits in QUANTIZED_BITS:
        return f"{bits}-bit weights are quantized and cannot be perturbed or trained directly"
    return None


def run_isolated(spec: ProfileSpec, method: str, timeout: float | None = None) -> dict:
    """Run one method in a fresh interpreter and return its measurements (or a failure record)."""
    with tempfile.TemporaryDirectory(prefix="zoact-profile-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, **{k: str(v) for k, v in spec.env.items()}}
        proc = subprocess.run(
            [sys.executable, "-m", "zoact_edge.profiling.methods", json.dumps(asdict(spec)), method, str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out.is_file():
            lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
            why = "killed by the OS (out of memory?)" if proc.returncode in (-9, 137) else (lines[-1] if lines else "")
            return {"status": "failed", "returncode": proc.returncode, "error": why[:500]}
        return {"status": "ok", **json.loads(out.read_text())}


def summarize(raw: dict, device_type: str) -> dict:
    """Turn one child's raw measurements into the report entry (peak, breakdown)."""
    if raw.get("status") != "ok":
        return raw
    sizes = raw.pop("sizes")
    if device_type == "cuda":
        c = raw["cuda"]
        peak, resident = c["max_reserved_bytes"], c["resident_bytes"]
        runtime = 0  # the CUDA context is outside the allocator: reported as outside_allocator_bytes
    else:
        peak, resident = raw["rss_peak_bytes"], raw["rss_resident_bytes"]
        runtime = max(resident - sizes["weights"], 0)
    held = sizes["adapters"] + sizes["optimizer_state"] + sizes["gradients"]
    breakdown = {"runtime": runtime, **sizes,
                 "activations_transients": max(peak - resident - held, 0)}
    return {"status": "ok", "peak_bytes": peak, "resident_bytes": resident, "breakdown": breakdown, **raw}


def profile(spec: ProfileSpec, methods: list[str], budget: int | None = None, profile_name: str | None = None,
            progress=None) -> dict:
    spec.validate()

    device_type = resolve_device(spec.device).type
    spec.device = device_type
    if spec.bits in QUANTIZED_BITS:  # quantize (once, cached) before anything is measured: a method
        # process that quantized first would start from a higher resident line than the others
        run_isolated(spec, "prepare")
    entries = {}
    for method in methods:
        reason = not_applicable(method, spec.bits)
        if reason:
            entries[method] = {"status": "not applicable", "reason": reason}
            continue
        if progress:
            progress(method)
        entries[method] = summarize(run_isolated(spec, method), device_type)
    base = entries.get("inference", {})
    for name, e in entries.items():
        if e.get("status") != "ok":
            continue
        e["ratio_to_inference"] = round(e["peak_bytes"] / base["peak_bytes"], 4) if base.get("status") == "ok" else None
        e["fits"] = (
            None if budget is None else e["peak_bytes"] + e.get("cuda", {}).get("outside_allocator_bytes", 0) <= budget
        )
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in asdict(spec).items() if k != "env"},
        "environment": _environment(spec),
        "measurement": ("CUDA: peak_bytes = torch.cuda.max_memory_reserved after reset_peak_memory_stats; "
                        "device-level use from torch.cuda.mem_get_info" if device_type == "cuda" else
                        "CPU: peak_bytes = peak process RSS of the method phase (VmHWM reset after setup); "
                        "resident_bytes = RSS after load + warm-up + malloc_trim"),
        "budget_bytes": budget,
        "profile": profile_name,
        "methods": entries,
    }


def _environment(spec: ProfileSpec) -> dict:
    """This process's software and machine, the environment every method's process adds and the allocator."""
    return {**environment(), "child_env": dict(spec.env),
            "allocator": "glibc defaults" if not any(k.startswith("MALLOC_") for k in spec.env) else
                         "MALLOC_* variables in child_env, applied to every method"}


