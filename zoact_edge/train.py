"""The ZO-Act tuning recipe, top to bottom.

load model -> build task -> pick target layers -> one-shot bases (or resume) -> zero-shot eval
-> ZO steps (forward pairs only, under inference mode) -> final eval -> PEFT adapter + summary.

Everything random is derived from ``(seed, step, ...)`` instead of from a running generator, so
a run resumed from a checkpoint replays exactly the batches and directions it would have seen.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import adapter_io, targets as tgt
from .basis import BasisConfig, compute_bases
from .config import TuneConfig
from .errors import UserError
from .evaluate import evaluate
from .layer import SharedProjection
from .memory import fmt_bytes, peak_cuda_bytes, peak_rss_bytes, release_free_memory
from .models import load_model
from .paths import atomic_write
from .tasks import ClassificationTask, build_task, hidden_states
from .zo import derive_seed, zo_step

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- small pieces


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


def batch_indices(step: int, batch_size: int, n: int, seed: int, _cache: dict = {}) -> list[int]:  # noqa: B006
    """Examples for ``step``: epochs of seeded permutations, read as one long stream."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        key = (seed, n, epoch)
        if key not in _cache:
            gen = torch.Generator().manual_seed(derive_seed(seed, 0xDA7A, epoch))
            _cache.clear()  # one epoch's permutation at a time is enough
            _cache[key] = torch.randperm(n, generator=gen).tolist()
        out.append(_cache[key][pos % n])
    return out


def make_optimizer(params, cfg: TuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def adapter_dtype(cfg: TuneConfig, device: torch.device) -> torch.dtype:
    if cfg.adapter_dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[cfg.adapter_dtype]


def prepare_output(cfg: TuneConfig) -> tuple[Path, bool]:
    """Check (without writing anything yet) that the output folder is usable."""
    out = Path(cfg.output or f"runs/{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}")
    existed = out.exists()
    if existed and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if existed and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"--output {out} is not empty; pass --overwrite, or --resume {out} to continue it")
    probe = out if existed else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: {probe} is not a writable folder")
    return out, existed


def inject_adapters(model, found: list[tgt.Target], bases: dict, coeffs: dict | None, dtype, device) -> dict:
    """Wrap every target; group members keep sharing one P tensor (and its x @ P) after the move."""
    members = collections.Counter(id(bases[t.name]) for t in found)
    moved: dict[int, tuple[torch.Tensor, SharedProjection]] = {}
    for t in found:
        P = bases[t.name]
        P_dev, shared = moved.setdefault(id(P), (P.to(device=device, dtype=dtype), SharedProjection(members[id(P)])))
        B = coeffs[t.name].to(device=device, dtype=dtype) if coeffs else torch.zeros(t.d_out, P.shape[1], device=device, dtype=dtype)
        tgt.wrap(model, t.name, P_dev, B, shared)
    return tgt.adapters(model)


# --------------------------------------------------------------------------- the recipe


def tune(cfg: TuneConfig, resume: str | None = None) -> dict:
    t_start = time.time()
    if resume:
        out, existed = Path(resume), True
        if adapter_io.find_checkpoint(out) is None:
            raise UserError(f"--resume {resume}: no checkpoint found there")
    else:
        out, existed = prepare_output(cfg)

    loaded = load_model(cfg.model, cfg.bits, cfg.quant_type, cfg.device, cfg.trust_remote_code)
    model, device = loaded.model, loaded.device
    task, splits = build_task(cfg, loaded.tokenizer)
    found = tgt.find_targets(model, cfg.targets, cfg.layers)
    tgt.check_rank(found, cfg.rank)
    dtype = adapter_dtype(cfg, device)
    eval_set = splits.validation[: cfg.eval_samples or None]

    def run_eval(desc):
        metrics = evaluate(model, task, eval_set, cfg.eval_batch_size, device, desc=desc)
        release_free_memory()
        return metrics

    # ---- adapters: fresh one-shot bases, or everything from the checkpoint
    if resume:
        state, P, B, opt_state = adapter_io.load_checkpoint(out)
        if set(P) != {t.name for t in found}:
            raise UserError(f"--resume {resume}: the checkpoint's layers do not match this model/targets")
        layers = inject_adapters(model, found, P, B, dtype, device)
        start_step, zero_shot, basis_seconds = state["step"], state["zero_shot"], state["basis_seconds"]
        _truncate_metrics(out / "metrics.jsonl", start_step)
    else:
        calib = _calibration_batches(cfg, task, splits.train, device)
        t0 = time.time()
        bases = compute_bases(
            {t.name: model.get_submodule(t.name) for t in found},
            {t.name: t.d_in for t in found},
            calib,
            lambda b: _forward_only(model, b),
            BasisConfig(rank=cfg.rank, method=cfg.basis_method, passes=cfg.basis_passes, seed=cfg.seed),
            progress=lambda desc, it: tqdm(it, desc=desc, leave=False, unit="batch"),
        )
        basis_seconds = time.time() - t0
        del calib
        release_free_memory()
        layers = inject_adapters(model, found, bases, None, dtype, device)
        zero_shot = run_eval("zero-shot eval")
        start_step, opt_state = 0, None
        # Only now, with the inputs validated, does anything get written.
        if cfg.overwrite and existed:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "run_config.json", {**cfg.to_dict(), "model_folder": loaded.folder})
    order = list(layers.values())
    optimizer = make_optimizer([l.B for l in order], cfg)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)

    # ---- ZO steps: every loss evaluation is forward-only, under inference mode
    batch_holder = {}

    def loss_fn() -> float:
        with torch.inference_mode():
            return float(task.loss(model, batch_holder["batch"]))

    def checkpoint(step):
        state = {"step": step, "zero_shot": zero_shot, "basis_seconds": basis_seconds, "config": cfg.to_dict()}
        adapter_io.save_checkpoint(out, layers, optimizer, state)

    try:
        bad_in_a_row, t_loop = 0, time.time()
        # Testing hook: die by SIGKILL at the start of this step, like a crash or an OOM kill.
        kill_at = int(os.environ.get("ZOACT_KILL_AT_STEP", "0"))
        bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="zo-act", unit="step")
        with open(out / "metrics.jsonl", "a") as metrics:
            for step in bar:
                if step + 1 == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                idx = batch_indices(step, cfg.batch_size, len(splits.train), cfg.seed)
                batch_holder["batch"] = task.collate([splits.train[i] for i in idx]).to(device)
                lr = cfg.lr * lr_factor(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                res = zo_step(order, loss_fn, optimizer, derive_seed(cfg.seed, step), cfg.eps, cfg.queries)
                record = {"step": step + 1, "loss": res.loss if res.finite else None, "lr": lr,
                          "projected_grad": res.projected, "skipped": not res.finite, "time": round(time.time() - t_start, 3)}
                if not res.finite:
                    bad_in_a_row += 1
                    log.warning("step %d: non-finite loss, update skipped", step + 1)
                    if bad_in_a_row >= cfg.max_bad_steps:
                        raise UserError(f"loss was NaN/inf for {bad_in_a_row} steps in a row; lower --lr or --eps")
                else:
                    bad_in_a_row = 0
                    bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2g}")
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    record["eval"] = run_eval(f"eval @ {step + 1}")
                    bar.write(f"step {step + 1}: {_fmt_metrics(record['eval'])}")
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                    checkpoint(step + 1)
    except BaseException:
        # A fresh run that dies before its first checkpoint leaves nothing behind.
        if not resume and not existed and adapter_io.find_checkpoint(out) is None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    bar.close()
    loop_seconds = time.time() - t_loop

    # ---- final evaluation and outputs
    final = run_eval("final eval")
    adapter_io.save_peft(out, layers, loaded.folder)
    checkpoint(cfg.steps)
    summary = {
        "zero_shot": zero_shot,
        "tuned": final,
        "steps": cfg.steps,
        "trainable_params": sum(l.B.numel() for l in order),
        "adapted_layers": len(order),
        "basis_seconds": round(basis_seconds, 2),
        "train_seconds_this_run": round(loop_seconds, 2),
        "seconds_per_step": round(loop_seconds / max(cfg.steps - start_step, 1), 3),
        "wall_seconds_this_run": round(time.time() - t_start, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": peak_cuda_bytes(),
        "bits": cfg.bits,
        "device": str(device),
    }
    _write_json(out / "summary.json", summary)
    summary["output"] = str(out)
    return summary


# --------------------------------------------------------------------------- helpers


def _forward_only(model, batch) -> None:
    with torch.inference_mode():
        hidden_states(model, batch)


def _calibration_batches(cfg, task, train: list, device) -> list:
    n = min(cfg.calib_samples, len(train))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 0xCA11B))
    idx = torch.randperm(len(train), generator=gen)[:n].tolist()
    bs = cfg.batch_size  # the training batch: calibration then peaks no higher than a ZO step
    return [task.collate([train[i] for i in idx[s:s + bs]]).to(device) for s in range(0, n, bs)]


def _truncate_metrics(path: Path, step: int) -> None:
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


def _write_json(path: Path, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def _fmt_metrics(m: dict) -> str:
    if "accuracy" in m:
        return f"accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}"
    return f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}"


def describe(summary: dict) -> str:
    z, t = summary["zero_shot"], summary["tuned"]
    lines = [f"output: {summary['output']}"]
    if "accuracy" in z:
        lines.append(f"validation accuracy: zero-shot {z['accuracy']:.4f} -> tuned {t['accuracy']:.4f} "
                     f"({100 * (t['accuracy'] - z['accuracy']):+.1f} points, {t['examples']} examples)")
    lines.append(f"validation loss: zero-shot {z['loss']:.4f} -> tuned {t['loss']:.4f}")
    lines.append(f"steps: {summary['steps']}  ({summary['seconds_per_step']:.2f} s/step)  "
                 f"wall time this run: {summary['wall_seconds_this_run']:.0f} s")
    lines.append(f"peak memory: RSS {fmt_bytes(summary['peak_rss_bytes'])}"
                 + (f", CUDA {fmt_bytes(summary['peak_cuda_bytes'])}" if summary["peak_cuda_bytes"] else ""))
    return "\n".join(lines)
