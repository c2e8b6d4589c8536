"""The run harness every recipe shares: the output folder, loading, the memory yardstick, the batch
stream, schedule and optimizer, the run log and the summary.

A recipe reads as setup -> loop -> finish; everything here is what two recipes would otherwise each
write: the same batches (:func:`batch_indices`), the same ``metrics.jsonl`` records and the same
``summary.json`` cost fields, so that benchmark harnesses compare methods like for like.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from .. import rundir
from ..config import TuneConfig
from ..data.tasks import build_task
from ..memory import fmt_bytes, peak_cuda_bytes, peak_rss_bytes
from ..models import Loaded, load_model
from ..paths import atomic_write
from ..profiling.meter import Meter, describe_tune_peak, inference_peak, padded_to, tune_peak_summary
from ..seeds import derive_seed


def claim_output(cfg: TuneConfig) -> rundir.RunDir:
    """The new run's folder, owned and locked before anything is loaded (see ``rundir``)."""
    return rundir.claim(cfg.output or f"runs/{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}", cfg.overwrite)


def write_json(path: Path, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


# --------------------------------------------------------------------------- setup


@dataclass
class Inputs:
    """What a recipe starts from: the frozen model, the task and its splits."""

    loaded: Loaded
    task: object
    splits: object
    eval_set: list

    @property
    def model(self):
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device


def load_inputs(cfg: TuneConfig, bits: int | None = None) -> Inputs:
    """The model (at ``bits``, default ``cfg.bits``), the task, its splits and the validation examples."""
    loaded = load_model(
        cfg.model, cfg.bits if bits is None else bits, cfg.quant_type, cfg.device, cfg.trust_remote_code
    )
    task, splits = build_task(cfg, loaded.tokenizer)
    return Inputs(loaded, task, splits, splits.validation[: cfg.eval_samples or None])


@dataclass
class Yardstick:
    """One inference forward of the longest batch the run can see (batch_size x max_length), measured
    before the run; then the run's own meter starts. The summary states the run's peak against it."""

    probe: object
    inference: dict
    meter: Meter

    def summary(self, last_phase: str | None = None) -> dict:
        return tune_peak_summary(self.meter.stop(last_phase), self.inference, self.probe.input_ids.shape)


def measure_yardstick(cfg: TuneConfig, inputs: Inputs) -> Yardstick:
    task, device = inputs.task, inputs.device
    probe = padded_to(task, task.collate(inputs.splits.train[: cfg.batch_size]).to(device), cfg.max_length)
    inference = inference_peak(inputs.model, task, probe, device)
    meter = Meter(device)
    meter.start()
    return Yardstick(probe, inference, meter)


# --------------------------------------------------------------------------- the loop


def lr_factor(step: int, cfg: TuneConfig) -> float:
    """Warmup then constant / linear decay / cosine decay, as a pure function of the step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, n: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(derive_seed(seed, 0xDA7A, epoch))
    return tuple(torch.randperm(n, generator=gen).tolist())


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Examples for ``step``: epochs of seeded permutations, read as one long stream."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [_epoch_order(seed, n, pos // n)[pos % n] for pos in positions]


def make_optimizer(params, cfg: TuneConfig) -> torch.optim.Optimizer:
    cfg = cfg.resolved()  # the method's default lr when --lr was not given
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def evaluating_now(cfg: TuneConfig, step: int) -> bool:
    """Whether the record of step ``step`` (1-based) carries a validation evaluation."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.steps


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint so a resumed run's log reads as one clean run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line from a killed run
    with atomic_write(path) as f:
        f.write("".join(l + "\n" for l in keep))


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
