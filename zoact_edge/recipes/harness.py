"""What every training recipe shares: the inputs it starts from (model, task, splits), the loop that
drives its steps and the ``summary.json`` it finishes with, so that benchmark harnesses compare methods
like for like. A recipe brings only its setup, its step and its outputs.

The pieces the loop uses live with their layers: the run folder in :mod:`zoact_edge.rundir`, the batch
stream in :mod:`zoact_edge.data.datasets`, the optimizer and schedule in :mod:`zoact_edge.zo.schedule`,
the memory yardstick in :mod:`zoact_edge.profiling.meter`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import TuneConfig
from ..data.datasets import batch_indices
from ..data.evaluate import example_lengths
from ..data.tasks import build_task
from ..environment import environment
from ..errors import UserError
from ..memory import fmt_bytes, peak_cuda_bytes, peak_rss_bytes
from ..models import Loaded, load_model
from ..profiling.meter import describe_tune_peak
from ..zo.schedule import lr_factor

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- loop

#: A method's step: ``(step, example indices, lr) -> (loss or None if not finite, the record's own fields)``.
StepFn = Callable[[int, list, float], tuple[float | None, dict]]


def train_loop(cfg: TuneConfig, inputs: Inputs, step_fn: StepFn, run_eval: Callable[[str], dict], *,
               metrics_path: Path | None, desc: str, examples_per_step: int, forwards_per_step: int, t_start: float,
               start_step: int = 0, skips_bad_steps: bool = True, after_step: Callable[[int], None] | None = None,
               show: bool = True) -> float:
    """Steps ``start_step`` .. ``cfg.steps - 1`` of a run, the same for every method: each step's examples from
    the run's batch stream, the lr schedule, one ``metrics.jsonl`` record (None: this rank writes none), an
    evaluation every ``--eval-every`` steps, then ``after_step(steps done)`` (a checkpoint).

    A non-finite loss is skipped ``--max-bad-steps`` times in a row (at most half the steps left) when the
    method's step skips its update on one (``skips_bad_steps``); a backprop step has already applied it, so
    the run stops at the first. Returns the seconds the steps took, the evaluations inside the loop left out,
    so s/step is a step's cost whatever ``--eval-every`` is.
    """
    bad_limit = max(1, min(cfg.max_bad_steps, (cfg.steps - start_step + 1) // 2)) if skips_bad_steps else 1
    advice = "lower --lr or --eps" if skips_bad_steps else "lower --lr"  # the skipping steps are the ZO ones
    bad_in_a_row, eval_seconds, t_loop = 0, 0.0, time.time()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=desc, unit="step",
               disable=not show)
    with open(metrics_path or os.devnull, "a") as metrics:
        for step in bar:
            idx = batch_indices(step, examples_per_step, len(inputs.splits.train), cfg.seed, inputs.train_lengths)
            lr = cfg.lr * lr_factor(step, cfg)
            loss, fields = step_fn(step, idx, lr)
            finite = loss is not None and math.isfinite(loss)
            if not finite:  # its projected gradients are NaN/inf too: null, so that metrics.jsonl stays strict JSON
                fields = {k: [x if math.isfinite(x) else None for x in v] if isinstance(v, list) else v
                          for k, v in fields.items()}
            record = {"step": step + 1, "forwards": (step + 1) * forwards_per_step, "loss": loss if finite else None,
                      "lr": lr, **fields, "skipped": not finite, "time": round(time.time() - t_start, 3)}
            if finite:
                bad_in_a_row = 0
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}")
            else:
                bad_in_a_row += 1
                if bad_in_a_row >= bad_limit:
                    raise UserError(f"step {step + 1}: the loss was NaN/inf"
                                    + (f" for {bad_in_a_row} steps in a row" if bad_in_a_row > 1 else "")
                                    + f"; {advice}")
                log.warning("step %d: non-finite loss, update skipped", step + 1)
            if cfg.evaluates_at(step + 1):
                t_eval = time.time()
                record["eval"] = run_eval(f"eval @ {step + 1}")
                eval_seconds += time.time() - t_eval
                bar.write(f"step {step + 1}: {fmt_metrics(record['eval'])}")
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if after_step is not None:
                after_step(step + 1)
    bar.close()
    return time.time() - t_loop - eval_seconds


# --------------------------------------------------------------------------- finish


def run_costs(loop_seconds: float, steps_run: int, t_start: float) -> dict:
    """The fields every method's summary.json shares: time, peak memory and the environment the run ran in
    (thread count and package versions move a ZO run's last digits: :mod:`zoact_edge.environment`)."""
    return {
        "train_seconds_this_run": round(loop_seconds, 2),
        "seconds_per_step": round(loop_seconds / max(steps_run, 1), 3),
        "wall_seconds_this_run": round(time.time() - t_start, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": peak_cuda_bytes(),
        "environment": environment(),
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
