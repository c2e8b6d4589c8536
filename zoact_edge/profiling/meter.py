"""The peak-memory meter that ``tune`` and ``zoact-edge profile`` share, and tune's yardstick.

:class:`Meter` takes a process's baseline and phase peaks (CPU RSS with the high-water mark reset,
Linux ``/proc/self/clear_refs``; on CUDA the allocator's peaks). Every recipe measures one inference
forward of its longest batch first (:class:`Yardstick`, :func:`inference_peak`), so its summary can
state the tuning peak as a multiple of inference (:func:`tune_peak_summary`), measured as ``profile``
measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tasks import Batch, ClassificationTask, positions
from ..memory import (
    current_rss_bytes,
    fmt_bytes,
    peak_rss_bytes,
    phase_peak_rss_bytes,
    release_free_memory,
    reset_peak_rss,
)


class Meter:
    """Baseline and phase peak for the current process (CPU RSS, and CUDA allocator if used)."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
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
        self.splits[name] = self._peaks()
        self.hwm_reset = reset_peak_rss() and self.hwm_reset
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def stop(self, last: str | None = None) -> dict:
        """The method's figures; with sub-phases (:meth:`split`), ``last`` names the final one."""
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
    extra = length - batch.input_ids.shape[1]
    if extra <= 0:
        return batch
    left = isinstance(task, ClassificationTask)
    pad = lambda t, v: torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=v)  # noqa: E731
    mask = pad(batch.attention_mask, 0)
    return Batch(pad(batch.input_ids, task.tokenizer.pad_token_id), mask, positions(mask), batch.labels,
                 None if batch.target_mask is None else pad(batch.target_mask, False))


def inference_peak(model, task, batch, device) -> dict:
    """Peak memory of one inference forward of ``batch`` in this process (tune's own yardstick).

    Measured as ``profile`` measures its ``inference`` method: after a tiny warm-up forward (first
    calls allocate once: kernels, caches, bitsandbytes' state), from a trimmed heap.
    """
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
    phases = {
        name: p.get("max_reserved_bytes", p["rss_peak_bytes"]) for name, p in tuning.get("phase_peaks", {}).items()
    }
    train = [v for k, v in phases.items() if k in TRAINING_PHASES]
    peak, base = (max(train) if train else peak_of(tuning)), peak_of(inference)
    evals = [v for k, v in phases.items() if k not in TRAINING_PHASES]
    return {"tune_peak_bytes": peak, "inference_peak_bytes": base, "inference_probe_shape": list(shape),
            "peak_ratio_to_inference": round(peak / base, 4) if base else None,
            "eval_peak_bytes": max(evals) if evals else None, "tune_phase_peaks": phases}


@dataclass
class Yardstick:
    """One inference forward of the longest batch the run can see (batch_size x max_length), measured
    before the run; then the run's own meter starts. The summary states the run's peak against it."""

    probe: Batch
    inference: dict
    meter: Meter

    @classmethod
    def measure(cls, model, task, examples: list, max_length: int, device) -> "Yardstick":
        """Measure on ``examples`` (one training batch) padded to ``max_length``, then start the run's meter."""
        probe = padded_to(task, task.collate(examples).to(device), max_length)
        inference = inference_peak(model, task, probe, device)
        meter = Meter(device)
        meter.start()
        return cls(probe, inference, meter)

    def summary(self, last_phase: str | None = None) -> dict:
        return tune_peak_summary(self.meter.stop(last_phase), self.inference, self.probe.input_ids.shape)


def describe_tune_peak(summary: dict) -> str | None:
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

