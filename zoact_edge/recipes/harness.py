"""What every recipe shares at its two ends: the inputs it starts from (model, task, splits) and the
``summary.json`` it finishes with, so that benchmark harnesses compare methods like for like.

The pieces in between live with their layers: the run folder in :mod:`zoact_edge.rundir`, the batch
stream in :mod:`zoact_edge.data.datasets`, the optimizer and schedule in :mod:`zoact_edge.zo.schedule`,
the memory yardstick in :mod:`zoact_edge.profiling.meter`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from ..config import TuneConfig
from ..data.evaluate import example_lengths
from ..data.tasks import build_task
from ..memory import fmt_bytes, peak_cuda_bytes, peak_rss_bytes
from ..models import Loaded, load_model
from ..profiling.meter import describe_tune_peak

# --------------------------------------------------------------------------- setup


@dataclass
class Inputs:
    """What a recipe starts from: the frozen model, the task and its splits."""

    loaded: Loaded
    task: object
    splits: object
    eval_set: list
    batch_order: str = "random"

    @functools.cached_property
    def train_lengths(self) -> list[int] | None:
        """--batch-order length: each training example's token count (counted once, when first asked for)."""
        return example_lengths(self.task, self.splits.train) if self.batch_order == "length" else None

    @property
    def model(self):
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device


def load_inputs(cfg: TuneConfig) -> Inputs:
    """The model (at ``cfg.load_bits``), the task, its splits and the validation examples."""
    loaded = load_model(cfg.model, cfg.load_bits, cfg.quant_type, cfg.device, cfg.trust_remote_code)
    task, splits = build_task(cfg, loaded.tokenizer)
    return Inputs(loaded, task, splits, splits.validation[: cfg.eval_samples or None], cfg.batch_order)


# --------------------------------------------------------------------------- finish


def run_costs(loop_seconds: float, steps_run: int, t_start: float) -> dict:
    """Time and peak-memory fields every method's summary.json shares."""
    return {
        "train_seconds_this_run": round(loop_seconds, 2),
        "seconds_per_step": round(loop_seconds / max(steps_run, 1), 3),
        "wall_seconds_this_run": round(time.time() - t_start, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": peak_cuda_bytes(),
    }


def run_summary(cfg: TuneConfig, zero_shot: dict, tuned: dict, test: dict | None, *, forwards_per_step: int,
                trainable_params: int, adapted_layers: int, basis_seconds: float, costs: dict, device, fused: bool,
                examples_per_step: int, peaks: dict, **extra) -> dict:
    """summary.json: the fields every training method writes, in one order (``extra`` before the peaks)."""
    return {
        "method": cfg.method,
        "zero_shot": zero_shot,
        "tuned": tuned,
        **({"test": test} if test is not None else {}),
        "steps": cfg.steps,
        "forwards": cfg.steps * forwards_per_step,
        "trainable_params": trainable_params,
        "adapted_layers": adapted_layers,
        "basis_seconds": round(basis_seconds, 2),
        **costs,
        "bits": cfg.bits,
        "device": str(device),
        "fused": fused,
        "examples_per_step": examples_per_step,
        **extra,
        **peaks,
    }


def fmt_metrics(m: dict) -> str:
    if "accuracy" in m:
        return f"accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}"
    return f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}"


def describe(summary: dict) -> str:
    """The lines ``zoact-edge tune`` prints at the end of a run."""
    z, t = summary["zero_shot"], summary["tuned"]
    lines = [f"output: {summary['output']}"]
    if "accuracy" in z:
        lines.append(f"validation accuracy: zero-shot {z['accuracy']:.4f} -> tuned {t['accuracy']:.4f} "
                     f"({100 * (t['accuracy'] - z['accuracy']):+.1f} points, {t['examples']} examples)")
    lines.append(f"validation loss: zero-shot {z['loss']:.4f} -> tuned {t['loss']:.4f}")
    if "compensation" in summary:  # --compensate: the 4-bit rounding undone inside the bases before step 1
        lines.append(f"compensated start: {fmt_metrics(summary['compensation']['start'])}")
    if "test" in summary:
        lines.append(f"test: {fmt_metrics(summary['test'])} ({summary['test']['examples']} examples)")
    if summary.get("method", "zoact") != "zoact":
        lines.append(f"method: {summary['method']}  ({summary['forwards']} forwards)")
    lines.append(f"steps: {summary['steps']}  ({summary['seconds_per_step']:.2f} s/step)  "
                 f"wall time this run: {summary['wall_seconds_this_run']:.0f} s")
    lines.append(f"peak memory: RSS {fmt_bytes(summary['peak_rss_bytes'])}"
                 + (f", CUDA {fmt_bytes(summary['peak_cuda_bytes'])}" if summary["peak_cuda_bytes"] else ""))
    if describe_tune_peak(summary):
        lines.append(describe_tune_peak(summary))
    return "\n".join(lines)
