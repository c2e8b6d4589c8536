"""Memory profiler: peak memory of inference, ZO-Act, MeZO and backprop tuning, side by side.

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
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError

METHODS = ("inference", "zoact", "mezo", "fo-lora", "fo-full")
SCHEMA = "zoact-edge/memory-profile/1"
BREAKDOWN = ("runtime", "weights", "adapters", "optimizer_state", "gradients", "activations_transients")
QUANTIZED_BITS = (4, 8)


@dataclass
class ProfileSpec:
    model: str | None = None
    bits: int = 32
    quant_type: str = "nf4"
    batch: int = 8
    seq: int = 64
    rank: int = 16
    task: str = "classification"  # tune's default objective (label position only) or "lm" (every token)
    steps: int = 2  # training steps per method: the second runs with the optimizer state in place
    targets: str | None = None
    layers: str | None = None
    device: str = "cpu"
    seed: int = 0
    eps: float = 1e-3
    lr: float = 1e-4
    env: dict = field(default_factory=dict)  # extra environment for every method's subprocess

    def validate(self) -> None:
        if self.bits not in (4, 8, 16, 32):
            raise UserError(f"--bits {self.bits}: choose 4, 8, 16 or 32")
        if self.batch < 1 or self.seq < 8:
            raise UserError("--batch must be >= 1 and --seq >= 8")
        if self.steps < 1:
            raise UserError("--steps must be >= 1")
        if self.task not in ("classification", "lm"):
            raise UserError(f"--task {self.task!r}: choose classification or lm")


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {spec!r}: choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '8 GB', '512MiB', '1e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{text!r} is not a memory size; use e.g. 8GiB, 16GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# --------------------------------------------------------------------------- child side


def not_applicable(method: str, bits: int) -> str | None:
    if method in ("mezo", "fo-full") and bits in QUANTIZED_BITS:
        return f"{bits}-bit weights are quantized and cannot be perturbed or trained directly"
    return None


def make_inputs(spec: ProfileSpec, tokenizer):
    """The task and one batch of exactly ``batch x seq`` real tokens (no padding), seeded.

    Rotten Tomatoes sentences are joined until each row is longer than ``seq`` and then cut
    (classification keeps the end, where the prompt asks for the label), so every method sees the
    same shapes and the same text.
    """
    from ..data.datasets import ClassificationExample, TextExample, load_rotten_tomatoes
    from ..data.tasks import RT_TEMPLATE, RT_WORDS, ClassificationTask, LMTask

    import torch

    train = load_rotten_tomatoes().train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    pos, examples = 0, []
    for _ in range(spec.batch):
        parts = []
        while True:
            ex = train[order[pos % len(order)]]
            pos += 1
            parts.append(ex.text)
            text = " ".join(parts)
            if len(tokenizer(text, add_special_tokens=False).input_ids) > spec.seq + 8 or len(parts) > 4 * spec.seq:
                break
        examples.append(ClassificationExample(text, ex.label) if spec.task == "classification" else TextExample(text))
    if spec.task == "classification":
        task = ClassificationTask(tokenizer, RT_TEMPLATE, list(RT_WORDS), spec.seq)
    else:
        task = LMTask(tokenizer, spec.seq)
    batch = task.collate(examples)
    if tuple(batch.input_ids.shape) != (spec.batch, spec.seq) or int(batch.attention_mask.min()) != 1:
        raise UserError(f"could not build a {spec.batch}x{spec.seq} batch without padding (the tokenizer is too coarse)")
    return task, batch


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared and tied tensors count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def model_weight_tensors(model):
    """Frozen tensors of the base model, bitsandbytes quantization state included; no adapters."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name or name.endswith((".B", ".P")):
            continue
        yield t
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            yield from (x for x in (qs.absmax, qs.code) if x is not None)
            if getattr(qs, "state2", None) is not None:
                yield from (x for x in (qs.state2.absmax, qs.state2.code) if x is not None)
        scb = getattr(t, "SCB", None)
        if scb is not None:
            yield scb


def optimizer_state_tensors(optimizer):
    """Per-parameter state tensors (Adam: exp_avg, exp_avg_sq); 0-d step counters are left out."""
    for state in optimizer.state.values():
        for v in state.values():
            if hasattr(v, "untyped_storage") and v.dim() > 0:
                yield v


class Meter:
    """Baseline and phase peak for the current process (CPU RSS, and CUDA allocator if used)."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        from ..memory import current_rss_bytes, release_free_memory, reset_peak_rss

        release_free_memory()
        self.resident = current_rss_bytes()
        self.hwm_reset = reset_peak_rss()
        self.splits: dict[str, dict] = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self.cuda_resident = torch.cuda.memory_reserved()
            self.cuda_outside = (total - free) - self.cuda_resident  # context, other libraries
            self.cuda_total = total

    def _peaks(self) -> dict:
        """Peaks since the last reset: RSS, and on CUDA the allocator's."""
        import torch

        from ..memory import phase_peak_rss_bytes

        peaks = {"rss_peak_bytes": phase_peak_rss_bytes()}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peaks["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            peaks["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return peaks

    def split(self, name: str) -> None:
        """End sub-phase ``name`` of the method: keep its peaks and start the high-water marks afresh.

        This tells which part of a method sets its peak (ZO-Act: the basis passes or the steps).
        :meth:`stop` still reports the whole method's peak, the largest over all sub-phases.
        """
        import torch

        from ..memory import reset_peak_rss

        self.splits[name] = self._peaks()
        self.hwm_reset = reset_peak_rss() and self.hwm_reset
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def stop(self, last: str | None = None) -> dict:
        """The method's figures; with sub-phases (:meth:`split`), ``last`` names the final one."""
        import torch

        from ..memory import peak_rss_bytes

        final = self._peaks()
        segments = [*self.splits.values(), final]
        peak = {k: max(seg[k] for seg in segments) for k in final}
        out = {"rss_resident_bytes": self.resident, "rss_peak_bytes": peak["rss_peak_bytes"],
               "process_peak_rss_bytes": peak_rss_bytes(), "peak_scope": "phase" if self.hwm_reset else "process"}
        if self.splits:
            out["phase_peaks"] = {**self.splits, (last or "rest"): final}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            out["cuda"] = {
                "resident_bytes": self.cuda_resident,
                "max_allocated_bytes": peak["max_allocated_bytes"],
                "max_reserved_bytes": peak["max_reserved_bytes"],
                "outside_allocator_bytes": self.cuda_outside,
                "device_used_bytes": total - free,
                "device_total_bytes": total,
            }
        return out


def padded_to(task, batch, length: int):
    """``batch`` padded to ``length`` tokens (the task's padding side): the longest batch tune can see."""
    import torch

    from ..data.tasks import Batch, ClassificationTask, _positions

    extra = length - batch.input_ids.shape[1]
    if extra <= 0:
        return batch
    left = isinstance(task, ClassificationTask)
    pad = lambda t, v: torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=v)  # noqa: E731
    mask = pad(batch.attention_mask, 0)
    return Batch(pad(batch.input_ids, task.tokenizer.pad_token_id), mask, _positions(mask), batch.labels,
                 None if batch.target_mask is None else pad(batch.target_mask, False))


def inference_peak(model, task, batch, device) -> dict:
    """Peak memory of one inference forward of ``batch`` in this process (tune's own yardstick).

    Measured as ``profile`` measures its ``inference`` method: after a tiny warm-up forward (first
    calls allocate once: kernels, caches, bitsandbytes' state), from a trimmed heap.
    """
    import torch

    with torch.inference_mode():
        model(input_ids=batch.input_ids[:1, :8])
    # The forward that task.loss runs, minus the (tiny) loss itself, so that counting task.loss
    # calls still counts training-loss evaluations.
    forward = task.logits if hasattr(task, "logits") else task.token_nll
    meter = Meter(device)
    meter.start()
    with torch.inference_mode():
        forward(model, batch)
    return meter.stop()


def peak_of(measured: dict) -> int:
    """The figure compared across methods: phase peak RSS on CPU, peak reserved on CUDA."""
    return measured["cuda"]["max_reserved_bytes"] if "cuda" in measured else measured["rss_peak_bytes"]


TRAINING_PHASES = ("basis", "steps")  # what profile's zoact method measures; evaluations are apart


def tune_peak_summary(tuning: dict, inference: dict, shape) -> dict:
    """Summary fields for tune: the peak of its training phases (basis passes and steps, as
    ``profile`` measures ``zoact``), the evaluations' peak, and the ratio to one inference forward."""
    phases = {name: p.get("max_reserved_bytes", p["rss_peak_bytes"]) for name, p in tuning.get("phase_peaks", {}).items()}
    train = [v for k, v in phases.items() if k in TRAINING_PHASES]
    peak, base = (max(train) if train else peak_of(tuning)), peak_of(inference)
    evals = [v for k, v in phases.items() if k not in TRAINING_PHASES]
    return {"tune_peak_bytes": peak, "inference_peak_bytes": base, "inference_probe_shape": list(shape),
            "peak_ratio_to_inference": round(peak / base, 4) if base else None,
            "eval_peak_bytes": max(evals) if evals else None, "tune_phase_peaks": phases}


def describe_tune_peak(summary: dict) -> str | None:
    from ..memory import fmt_bytes

    if not summary.get("peak_ratio_to_inference"):
        return None
    b, l = summary["inference_probe_shape"]
    kind = "RSS" if summary.get("device", "cpu") == "cpu" else "CUDA reserved"
    what = "basis passes + steps" if summary.get("tune_phase_peaks") else "the whole run"
    evals = (f"; evaluations (batch {summary['eval_batch_size']}) peaked at {fmt_bytes(summary['eval_peak_bytes'])}"
             if summary.get("eval_peak_bytes") and summary.get("eval_batch_size") else "")
    return (f"tuning peak ({kind}, {what}): {fmt_bytes(summary['tune_peak_bytes'])} = "
            f"{summary['peak_ratio_to_inference']:.2f}x the yardstick, one inference forward at batch {b} x {l} tokens "
            f"({fmt_bytes(summary['inference_peak_bytes'])}, measured in this run as `zoact-edge profile` does){evals}")


def _loss_fn(task, model, batch):
    import torch

    def loss():
        with torch.inference_mode():
            return float(task.loss(model, batch))

    return loss


def _run_method(spec: ProfileSpec, method: str) -> dict:
    """Load, warm up, reset the peak, run ``method``; return measurements and tensor sizes."""
    import torch

    from ..adapters import targets as tgt
    from ..models import load_model

    torch.manual_seed(spec.seed)
    t0 = time.time()
    loaded = load_model(spec.model, spec.bits, spec.quant_type, spec.device)
    model, device = loaded.model, loaded.device
    task, batch = make_inputs(spec, loaded.tokenizer)
    batch = batch.to(device)
    if method.startswith("fo-"):
        # Backprop runs in training mode. It must be set before any forward: in eval mode the first
        # inference call repacks bitsandbytes 4-bit weights (AVX512-BF16 CPUs) into an
        # inference-only layout that autograd cannot go through. (LoRA dropout is 0; the model's
        # own dropout, if it has any, is part of real training.)
        model.train()
    with torch.inference_mode():  # tiny warm-up: bitsandbytes repacks 4-bit weights on first use
        model(input_ids=batch.input_ids[:1, :8])
    found = tgt.find_targets(model, spec.targets, spec.layers)
    tgt.check_rank(found, spec.rank)
    weights = storage_bytes(model_weight_tensors(model))
    meter = Meter(device)
    meter.start()
    t1 = time.time()
    sizes = {"weights": weights, "adapters": 0, "optimizer_state": 0, "gradients": 0}
    info: dict = {}
    if method == "prepare":  # load_model above has quantized and cached the model: nothing to measure
        pass
    elif method == "inference":
        with torch.inference_mode():
            info["loss"] = float(task.loss(model, batch))
    elif method == "zoact":
        info.update(_zoact(spec, model, task, batch, found, device, sizes, meter))
    elif method == "mezo":
        from ..zo.baselines import mezo_params, mezo_step
        from ..zo.estimator import derive_seed

        params = mezo_params(model, [t.name for t in found])
        loss = _loss_fn(task, model, batch)
        for s in range(spec.steps):
            res = mezo_step(params, loss, derive_seed(spec.seed, s), spec.eps, spec.lr)
        info["loss"] = (res.loss_plus + res.loss_minus) / 2
        info["trainable_params"] = sum(p.numel() for p in params)
    elif method in ("fo-lora", "fo-full"):
        from ..zo.baselines import add_lora, backprop_step, full_params

        if method == "fo-lora":
            params = add_lora(model, [t.name for t in found], spec.rank)
            sizes["adapters"] = storage_bytes(params)
        else:
            params = full_params(model)
        opt = torch.optim.Adam(params, lr=spec.lr)

        def on_grads():
            sizes["gradients"] = storage_bytes(p.grad for p in params)

        for _ in range(spec.steps):
            info["loss"] = backprop_step(lambda: task.loss(model, batch), opt, on_grads)
        sizes["optimizer_state"] = storage_bytes(optimizer_state_tensors(opt))
        info["trainable_params"] = sum(p.numel() for p in params)
    else:
        raise UserError(f"unknown method {method!r}")
    measured = meter.stop("steps" if method == "zoact" else None)
    measured.update(sizes=sizes, setup_seconds=round(t1 - t0, 2), method_seconds=round(time.time() - t1, 2),
                    pid=os.getpid(), **info)
    return measured


def _zoact(spec, model, task, batch, found, device, sizes, meter) -> dict:
    """A real ZO-Act start: basis passes on the batch, adapters, Adam, ``steps`` ZO steps as tune takes them.

    The meter is split after the basis passes, so the report tells whether they or the steps
    (adapters, optimizer state, perturbed forwards) set the peak.
    """
    import torch

    from ..adapters.basis import BasisConfig, compute_bases
    from ..memory import release_free_memory
    from ..data.tasks import hidden_states
    from ..zo.prefix import adapted_blocks, make_loss_terms
    from ..recipes.zoact import inject_adapters
    from ..zo.estimator import apply_update, derive_seed, estimate_batches, fused_by_default

    def forward(b):
        with torch.inference_mode():
            hidden_states(model, b)

    bases = compute_bases({t.name: model.get_submodule(t.name) for t in found}, {t.name: t.d_in for t in found},
                          [batch], forward, BasisConfig(rank=spec.rank, seed=spec.seed))
    release_free_memory()  # as tune does between the basis passes and the steps
    meter.split("basis")  # after the trim: the steps' high-water mark starts from what is in use
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    adapters = inject_adapters(model, found, bases, None, dtype, device)
    layers = list(adapters.values())
    del bases
    opt = torch.optim.Adam([l.B for l in layers], lr=spec.lr)
    # The step tune takes by default on this device, the frozen prefix shared as tune shares it.
    fused = fused_by_default(device.type)
    loss_terms = make_loss_terms(model, task, adapted_blocks(model, adapters))
    for s in range(spec.steps):
        seed = derive_seed(spec.seed, s)
        res = estimate_batches(layers, loss_terms, [batch], seed, spec.eps, fused=fused)
        apply_update(layers, res, opt, seed)
    sizes["adapters"] = storage_bytes([l.B for l in layers] + [l.P for l in layers])
    sizes["optimizer_state"] = storage_bytes(optimizer_state_tensors(opt))
    sizes["gradients"] = storage_bytes(l.B for l in layers)  # B.grad exists between estimate and step
    return {"loss": res.loss, "trainable_params": sum(l.B.numel() for l in layers), "fused": fused}


def child_main(argv: list[str]) -> int:
    """``python -m zoact_edge.profiling.harness SPEC_JSON METHOD OUT_JSON``: one method, one process."""
    from ..paths import atomic_write

    spec_json, method, out_path = argv
    logging_quiet()
    result = _run_method(ProfileSpec(**json.loads(spec_json)), method)
    with atomic_write(out_path) as f:
        json.dump(result, f)
    return 0


def logging_quiet() -> None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --------------------------------------------------------------------------- parent side


def run_isolated(spec: ProfileSpec, method: str, timeout: float | None = None) -> dict:
    """Run one method in a fresh interpreter and return its measurements (or a failure record)."""
    with tempfile.TemporaryDirectory(prefix="zoact-profile-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, **{k: str(v) for k, v in spec.env.items()}}
        proc = subprocess.run([sys.executable, "-m", "zoact_edge.profiling.harness", json.dumps(asdict(spec)), method, str(out)],
                              capture_output=True, text=True, env=env, timeout=timeout)
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
    from ..models import resolve_device

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
        e["fits"] = None if budget is None else e["peak_bytes"] + e.get("cuda", {}).get("outside_allocator_bytes", 0) <= budget
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
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "packages": versions, "child_env": dict(spec.env),
            "allocator": "glibc defaults" if not any(k.startswith("MALLOC_") for k in spec.env) else
                         "MALLOC_* variables in child_env, applied to every method"}


# --------------------------------------------------------------------------- report files


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def report_markdown(report: dict) -> str:
    from ..memory import fmt_bytes

    s = report["settings"]
    lines = [f"# Memory profile: {s['model'] or 'default model'}, {s['bits']}-bit, batch {s['batch']} x seq {s['seq']}, "
             f"rank {s['rank']}", "",
             f"Device: {s['device']}. Task loss: {s['task']}. Training methods run {s['steps']} step(s). "
             f"{report['measurement']}. Allocator: {report['environment']['allocator']}.", ""]
    if report.get("budget_bytes"):
        lines += [f"Budget: {fmt_bytes(report['budget_bytes'])}"
                  + (f" (profile {report['profile']})" if report.get("profile") else ""), ""]
    head = ["method", "peak MiB", "ratio to inference", "runtime", "weights", "adapters", "optimizer", "gradients",
            "activations + transients"] + (["fits"] if report.get("budget_bytes") else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in report["methods"].items():
        if e.get("status") != "ok":
            row = [name, e["status"], "", "", "", "", "", "", e.get("reason") or e.get("error", "")]
            row += [""] if report.get("budget_bytes") else []
        else:
            b = e["breakdown"]
            ratio = "" if e.get("ratio_to_inference") is None else f"{e['ratio_to_inference']:.3f}"
            row = [name, _mib(e["peak_bytes"]), ratio] + [_mib(b[k]) for k in BREAKDOWN]
            row += (["yes" if e["fits"] else "no"] if report.get("budget_bytes") else [])
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Breakdown columns are MiB. runtime = resident RSS after loading minus the weights (interpreter, "
              "libraries, allocator); activations + transients = peak minus resident minus the adapter, optimizer "
              "and gradient tensors.", ""]
    lines += [line for name, e in report["methods"].items() if (line := _phases_line(name, e, s["device"]))]
    return "\n".join(lines)


def _phases_line(name: str, entry: dict, device_type: str) -> str | None:
    """'zoact: basis passes peak ... MiB, steps peak ... MiB': which part of a method sets its peak."""
    phases = entry.get("phase_peaks")
    if entry.get("status") != "ok" or not phases:
        return None
    key = "max_reserved_bytes" if device_type == "cuda" else "rss_peak_bytes"
    words = {"basis": "basis passes", "steps": "adapters, optimizer and steps"}
    parts = [f"{words.get(p, p)} {_mib(seg[key])} MiB (+{_mib(seg[key] - entry['resident_bytes'])} over resident)"
             for p, seg in phases.items()]
    return f"Peak by part, {name}: " + "; ".join(parts) + ".\n"


def report_png(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..paths import atomic_save_file

    ok = {n: e for n, e in report["methods"].items() if e.get("status") == "ok"}
    fig, ax = plt.subplots(figsize=(1.6 * max(len(ok), 2) + 3, 4.5))
    names = list(ok)
    bottoms = [0.0] * len(names)
    for key in BREAKDOWN:
        vals = [ok[n]["breakdown"][key] / 2**20 for n in names]
        ax.bar(names, vals, bottom=bottoms, label=key.replace("_", " ").replace("activations ", "activations + "))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    if "inference" in ok:
        ax.axhline(ok["inference"]["peak_bytes"] / 2**20, color="black", linestyle="--", linewidth=1,
                   label="inference peak")
    s = report["settings"]
    title = f"peak memory, {s['bits']}-bit, batch {s['batch']} x seq {s['seq']}, rank {s['rank']} ({s['device']})"
    budget = report.get("budget_bytes")
    if budget and budget <= 1.5 * max(bottoms, default=0) * 2**20:
        ax.axhline(budget / 2**20, color="red", linewidth=1, label="budget")
    elif budget:  # far above every bar: a line would flatten the chart, so say it in the title
        title += f"; budget {budget / 2**30:.1f} GiB"
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    atomic_save_file(lambda p: fig.savefig(p, format="png", dpi=100), path)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    from ..paths import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "report.json") as f:
        json.dump(report, f, indent=2)
    with atomic_write(out / "report.md") as f:
        f.write(report_markdown(report))
    report_png(report, out / "report.png")


def describe(report: dict) -> str:
    from ..memory import fmt_bytes

    rows = []
    for name, e in report["methods"].items():
        if e.get("status") != "ok":
            rows.append(f"{name:10s} {e['status']}: {e.get('reason') or e.get('error', '')}")
            continue
        ratio = e.get("ratio_to_inference")
        fits = "" if e.get("fits") is None else ("  fits" if e["fits"] else "  DOES NOT FIT")
        rows.append(f"{name:10s} peak {fmt_bytes(e['peak_bytes']):>10s}"
                    + ("" if ratio is None else f"  {ratio:.3f}x inference") + fits)
    return "\n".join(rows)


# --------------------------------------------------------------------------- command line


def add_profile_parser(sub) -> None:
    """``zoact-edge profile``: registered by cli.py; kept here so the CLI module stays small."""
    p = sub.add_parser(
        "profile", help="measure peak memory of inference vs ZO-Act vs MeZO vs backprop, each in its own process",
        description="Runs each method in a fresh subprocess on the same model, batch and loss and reports peak "
                    "memory, a breakdown and the ratio to an inference forward. Writes report.json, report.md "
                    "and report.png to --out.")
    p.add_argument("--model", help="hub id, local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, default=32, choices=[4, 8, 16, 32], help="frozen weight precision (default: 32)")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit quantization type (default: nf4)")
    p.add_argument("--batch", type=int, default=8, help="examples per batch (default: 8)")
    p.add_argument("--seq", type=int, default=64, help="tokens per example, no padding (default: 64)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank for zoact and fo-lora (default: 16)")
    p.add_argument("--methods", default="inference,zoact,mezo,fo-lora",
                   help=f"comma-separated, from {','.join(METHODS)} (default: inference,zoact,mezo,fo-lora)")
    p.add_argument("--task", default="classification", choices=["classification", "lm"],
                   help="loss: classification (tune's default: label position only) or lm (every token) (default: classification)")
    p.add_argument("--steps", type=int, default=2, help="training steps per method (default: 2)")
    p.add_argument("--targets", help="name patterns of the linears to adapt (default: all in the blocks)")
    p.add_argument("--layers", help="block range to adapt, e.g. 20-29 (default: all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for the inputs and directions (default: 0)")
    p.add_argument("--budget", help="memory budget, e.g. 8GiB: marks each method fits / does not fit")
    p.add_argument("--profile", help="device profile whose budget to use (see `zoact-edge profiles`)")
    p.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                   help="set glibc MALLOC_MMAP_THRESHOLD_ for every method (less fragmentation, slower steps)")
    p.add_argument("--out", help="folder for report.json, report.md and report.png")
    sub.add_parser("profiles", help="list the device profiles (memory budget, device, bits, limits)",
                   description="Device profiles for `tune --profile NAME` and `profile --profile NAME`: TOML files "
                               "in the profiles/ folder (or $ZOACT_PROFILES).")


def cmd_profiles(args: dict) -> int:
    from .fit import describe_profiles, list_profiles

    print(describe_profiles(list_profiles()))
    return 0


def cmd_profile(args: dict) -> int:
    budget, name = None, args.get("profile")
    if args.get("budget") and name:
        raise UserError("give --budget or --profile, not both")
    if args.get("budget"):
        budget = parse_bytes(args["budget"])
    elif name:
        from .fit import load_profile

        budget = load_profile(name).budget_bytes
    env = {}
    if args.get("malloc_mmap_threshold") is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = int(args["malloc_mmap_threshold"])
    spec = ProfileSpec(model=args.get("model"), bits=args["bits"], quant_type=args["quant_type"], batch=args["batch"],
                       seq=args["seq"], rank=args["rank"], task=args["task"], steps=args["steps"],
                       targets=args.get("targets"), layers=args.get("layers"), device=args["device"],
                       seed=args["seed"], env=env)
    methods = parse_methods(args["methods"])
    report = profile(spec, methods, budget, name, progress=lambda m: print(f"profiling {m} ...", file=sys.stderr))
    print(describe(report))
    if args.get("out"):
        write_report(report, Path(args["out"]))
        print(f"report: {args['out']}/report.json, report.md, report.png")
    failed = [n for n, e in report["methods"].items() if e.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
