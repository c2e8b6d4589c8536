"""The ZO-Act tuning recipe, top to bottom.

load model -> build task -> pick target layers -> one-shot bases (or resume) -> zero-shot eval
-> ZO steps (forward pairs only, under inference mode) -> final eval -> PEFT adapter + summary.

Everything random is derived from ``(seed, step, ...)`` instead of from a running generator, so
a run resumed from a checkpoint replays exactly the batches and directions it would have seen.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import files as adapter_io, targets as tgt
from ..zo import distributed, perturb
from .. import rundir
from ..adapters.basis import BasisConfig, compute_bases
from ..config import TuneConfig
from ..errors import UserError
from ..data.evaluate import evaluate
from ..profiling.fit import check_batch_fits
from ..adapters.layer import SharedProjection
from ..memory import fmt_bytes, peak_cuda_bytes, peak_rss_bytes, release_free_memory
from ..models import load_model
from ..paths import atomic_write
from ..profiling.harness import Meter, describe_tune_peak, inference_peak, padded_to, tune_peak_summary
from ..zo.prefix import PrefixCache, adapted_blocks, make_loss_terms
from ..adapters.subspace import fold_and_resample, input_groups, random_bases
from ..data.tasks import build_task, hidden_states, scored_mask
from ..zo.estimator import apply_update, derive_seed, estimate_batches, fused_by_default, zo_step

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


def adapter_dtype(cfg: TuneConfig, device: torch.device) -> torch.dtype:
    if cfg.adapter_dtype == "auto":
        return torch.float32 if device.type == "cpu" or cfg.backend == "ort" else torch.float16
    return DTYPES[cfg.adapter_dtype]


def claim_output(cfg: TuneConfig) -> rundir.RunDir:
    """The new run's folder, owned and locked before anything is loaded (see ``rundir``)."""
    return rundir.claim(cfg.output or f"runs/{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}", cfg.overwrite)


def inject_adapters(model, found: list[tgt.Target], bases: dict, coeffs: dict | None, dtype, device) -> dict:
    """Wrap every target; group members keep sharing one P tensor (and its x @ P) after the move.

    ``device=None`` puts each adapter on its base layer's device, so a model sharded over GPUs
    with accelerate's ``device_map="auto"`` gets its adapters next to the weights they adapt.

    ``dtype`` is that of the bases and the adapter's matmuls. The coefficients B are the trained
    tensor and stay fp32 (fp64 with fp64 bases): the optimizer steps an fp32 master copy. (fp16 B
    under Adam turned every loss non-finite from the second step on CUDA: an Adam second moment
    0.001 g^2 underflows to 0 in fp16 for |g| < 8e-3, and fp16 has no room for eps = 1e-8.)
    """
    place = {t.name: device if device is not None else next(model.get_submodule(t.name).parameters()).device
             for t in found}
    members = collections.Counter((id(bases[t.name]), place[t.name]) for t in found)
    coeff_dtype = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 where the bases are fp64
    moved: dict[tuple, tuple[torch.Tensor, SharedProjection]] = {}
    for t in found:
        P, dev = bases[t.name], place[t.name]
        P_dev, shared = moved.setdefault((id(P), dev), (P.to(device=dev, dtype=dtype), SharedProjection(members[id(P), dev])))
        B = (coeffs[t.name].to(device=dev, dtype=coeff_dtype) if coeffs else
             torch.zeros(t.d_out, P.shape[1], device=dev, dtype=coeff_dtype))
        tgt.wrap(model, t.name, P_dev, B, shared)
    return tgt.adapters(model)


# --------------------------------------------------------------------------- the recipe


def tune(cfg: TuneConfig, resume: str | None = None) -> dict:
    t_start = time.time()
    cfg = cfg.resolved()
    if cfg.profile:  # bits / batch / length / rank lowered until the estimate fits the profile's budget
        from ..profiling.fit import apply_profile

        cfg = apply_profile(cfg)
    if cfg.method == "calibrate":  # the prior-only baseline: no weights change
        from .calibrate import tune_calibrate

        if resume:
            raise UserError("--resume: calibrate runs take no steps, so there is nothing to resume")
        return tune_calibrate(cfg)
    if cfg.method in ("mezo", "fo-lora"):  # the baselines: same data, eval and outputs, own loop
        from .baselines import tune_baseline

        return tune_baseline(cfg, resume)
    if cfg.backend == "ort" and cfg.bits not in (4, 32):  # refused now, not after a minute of calibration
        raise UserError(f"--backend ort runs the frozen model in fp32 or, with --bits 4, as int4 MatMulNBits; not --bits {cfg.bits}")
    if cfg.resample_every and (resume or cfg.backend != "torch"):
        raise UserError("--resample-every runs need --backend torch and cannot be resumed (the folded weights are not checkpointed)")
    ranks = distributed.init_from_env(cfg.device)  # under torchrun: this process's rank; else rank 0 of 1
    if cfg.backend != "torch" and (cfg.fused or cfg.accum_steps > 1 or ranks.active):
        raise UserError(f"--fused, --accum-steps and torchrun need --backend torch (not {cfg.backend})")
    if not ranks.is_main:  # never writes: every write below is main-rank only
        return _tune(cfg, resume, None, ranks, t_start)
    with rundir.claim_existing(resume, f"--resume {resume}") if resume else claim_output(cfg) as run:
        return _tune(cfg, resume, run, ranks, t_start)


def _tune(cfg: TuneConfig, resume: str | None, run: rundir.RunDir | None, ranks, t_start: float) -> dict:
    """The run itself; ``run`` is the claimed output folder (None on the ranks that do not write)."""
    main = ranks.is_main  # only the main rank writes files
    # --backend ort exports the fp32 model and quantizes the graph itself (--bits 4: int4 MatMulNBits)
    loaded = load_model(cfg.model, 32 if cfg.backend == "ort" else cfg.bits, cfg.quant_type, cfg.device, cfg.trust_remote_code)
    model, device = loaded.model, loaded.device
    task, splits = build_task(cfg, loaded.tokenizer)
    found = tgt.find_targets(model, cfg.targets, cfg.layers)
    tgt.check_rank(found, cfg.rank)
    default = fused_by_default(device.type)  # fit's activation coefficients assume this step
    fused = cfg.fused if cfg.fused is not None else (default and cfg.backend == "torch")
    pairs = cfg.queries if cfg.fuse_queries else 1  # rows held per example beyond the default step
    check_batch_fits(model.config, found, cfg, device, pairs if default else (2 * pairs if fused else 1))
    dtype = adapter_dtype(cfg, device)
    eval_set = splits.validation[: cfg.eval_samples or None]
    # Yardstick for the peak printed at the end: one inference forward of the longest batch this
    # run can see (batch_size x max_length), measured here; then the run's own peak starts.
    probe = padded_to(task, task.collate(splits.train[: cfg.batch_size]).to(device), cfg.max_length)
    yardstick = inference_peak(model, task, probe, device)
    tune_meter = Meter(device)
    tune_meter.start()

    ort_loss = None  # --backend ort: once built, evaluations run the (possibly int4) graph too

    def run_eval(desc, examples=None):
        examples = eval_set if examples is None else examples
        if ort_loss is not None:
            metrics = ort_loss.evaluate(task, examples, cfg.eval_batch_size, desc=desc)
        else:
            metrics = evaluate(model, task, examples, cfg.eval_batch_size, device, desc=desc)
        release_free_memory()
        return metrics

    # ---- adapters: fresh one-shot bases, or everything from the checkpoint
    energies: dict = {}  # each activation basis column's energy (--perturb whiten)
    if resume:
        state, P, B, opt_state = adapter_io.load_checkpoint(Path(resume))
        if set(P) != {t.name for t in found} or set(B) != set(P) or any(
                B[t.name].shape != (t.d_out, P[t.name].shape[1]) or P[t.name].shape[0] != t.d_in for t in found):
            raise UserError(f"--resume {resume}: the checkpoint's layers do not match this model/targets")
        layers = inject_adapters(model, found, P, B, dtype, device)
        cache = PrefixCache(model, layers, cfg.cache_prefix_mb * 2**20) if cfg.cache_prefix else None  # across epochs
        start_step, zero_shot, basis_seconds = state["step"], state["zero_shot"], state["basis_seconds"]
        perturb.apply(layers, perturb.from_state(state.get("z_scales")))
        if main:
            _truncate_metrics(run.path / "metrics.jsonl", start_step)
    elif cfg.method == "subspace":  # the ablation: random orthonormal bases, same groups and layers
        t0 = time.time()
        first = _calibration_batches(cfg, task, splits.train, device)[0]
        groups = input_groups({t.name: model.get_submodule(t.name) for t in found}, lambda: _forward_only(model, first))
        bases = random_bases(groups, {t.name: t.d_in for t in found}, cfg.rank, cfg.seed)
        basis_seconds = time.time() - t0
        del first
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
            token_mask=scored_mask if cfg.calib_tokens == "scored" else None, energies=energies,
        )
        basis_seconds = time.time() - t0
        del calib
    if not resume:
        release_free_memory()
        tune_meter.split("basis")  # the yardstick's phases: see profiler.tune_peak_summary
        layers = inject_adapters(model, found, bases, None, dtype, device)
        perturb.apply(layers, perturb.column_scales(cfg.perturb, layers, energies or None))
        # Built before anything is written: it refuses unsupported architectures.
        cache = PrefixCache(model, layers, cfg.cache_prefix_mb * 2**20) if cfg.cache_prefix else None  # across epochs
        if cfg.backend == "ort":
            ort_loss = _ort_loss(model, task, layers, splits, loaded.folder, device, cfg.bits)
        zero_shot = run_eval("zero-shot eval")
        tune_meter.split("zero-shot eval")
        start_step, opt_state = 0, None
        if main:
            _write_json(run.path / "run_config.json", {**cfg.to_dict(), "model_folder": loaded.folder})
    order = list(layers.values())
    distributed.broadcast_adapters(ranks, order)  # all ranks start from rank 0's exact adapter
    optimizer = make_optimizer([l.B for l in order], cfg)
    if opt_state is not None:
        try:
            optimizer.load_state_dict(opt_state)
            if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape
                   for p, st in optimizer.state.items() for v in st.values()):
                raise ValueError("moment shapes differ from the coefficients'")
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"--resume {resume}: the checkpoint's optimizer state does not fit this run ({e})") from None

    # ---- ZO steps: every loss evaluation is forward-only, under inference mode
    loss_terms = make_loss_terms(model, task, adapted_blocks(model, layers) if cfg.share_prefix else None, cache)
    reduce_losses = distributed.loss_reducer(ranks, device)  # sums 4 x queries scalars over ranks
    per_rank = cfg.batch_size * cfg.accum_steps
    forwards_per_step = 2 * cfg.queries * cfg.accum_steps * ranks.world_size  # batch-sized forwards, all ranks
    folded: dict = {}  # subspace resampling: earlier (P, B) pairs, already merged into the weights
    batch_holder = {}

    if cfg.backend == "ort":  # the same loss, evaluated by ONNX Runtime at the layers' B +/- eps Z
        ort_loss = ort_loss or _ort_loss(model, task, layers, splits, loaded.folder, device, cfg.bits)  # resumed runs

        def loss_fn() -> float:
            return ort_loss.loss(batch_holder["batch"])

    def checkpoint(step):
        if not main:
            return
        state = {"step": step, "zero_shot": zero_shot, "basis_seconds": basis_seconds, "config": cfg.to_dict(),
                 "z_scales": perturb.to_state(layers)}
        adapter_io.save_checkpoint(run.path, layers, optimizer, state)
        run.commit()  # an --overwrite run replaces the old one at its first checkpoint

    bad_in_a_row, t_loop = 0, time.time()
    # A short run is not allowed to skip most of its steps and still "succeed" with an untrained adapter.
    bad_limit = max(1, min(cfg.max_bad_steps, (cfg.steps - start_step + 1) // 2))
    # Testing hook: die by SIGKILL at the start of this step, like a crash or an OOM kill.
    kill_at = int(os.environ.get("ZOACT_KILL_AT_STEP", "0"))
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="zo-act", unit="step", disable=not main)
    with open(run.path / "metrics.jsonl" if main else os.devnull, "a") as metrics:
        for step in bar:
            if step + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            # The step's examples: this rank's slice, as accum_steps micro-batches of batch_size.
            idx = batch_indices(step, per_rank * ranks.world_size, len(splits.train), cfg.seed)
            idx = idx[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]
            micro = [task.collate([splits.train[i] for i in idx[s:s + cfg.batch_size]])
                     .with_example_ids(idx[s:s + cfg.batch_size]).to(device)  # the --cache-prefix keys
                     for s in range(0, per_rank, cfg.batch_size)]
            lr = cfg.lr * lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_seed = derive_seed(cfg.seed, step)
            if cfg.resample_every and step and step % cfg.resample_every == 0:
                fold_and_resample(layers, groups, cfg.rank, cfg.seed, step // cfg.resample_every, folded)
                optimizer.state.clear()  # Adam moments of the old coordinates mean nothing now
            if cfg.backend == "torch":
                res = estimate_batches(order, loss_terms, micro, step_seed, cfg.eps, cfg.queries,
                                       fused, cfg.fuse_queries, reduce_losses)
                apply_update(order, res, optimizer, step_seed)
            else:
                batch_holder["batch"] = micro[0]
                res = zo_step(order, loss_fn, optimizer, step_seed, cfg.eps, cfg.queries)
            record = {"step": step + 1, "forwards": (step + 1) * forwards_per_step,
                      "loss": res.loss if res.finite else None, "lr": lr,
                      "projected_grad": res.projected, "skipped": not res.finite, "time": round(time.time() - t_start, 3)}
            if not res.finite:
                bad_in_a_row += 1
                log.warning("step %d: non-finite loss, update skipped", step + 1)
                if bad_in_a_row >= bad_limit:
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
    bar.close()
    loop_seconds = time.time() - t_loop
    tune_meter.split("steps")

    # ---- final evaluation and outputs
    final = run_eval("final eval")
    test = run_eval("test eval", splits.test) if cfg.test_eval else None
    if main:
        adapter_io.save_peft(run.path, layers, loaded.folder, folded)
    checkpoint(cfg.steps)
    summary = {
        "method": cfg.method,
        "zero_shot": zero_shot,
        "tuned": final,
        **({"test": test} if test is not None else {}),
        "steps": cfg.steps,
        "forwards": cfg.steps * forwards_per_step,
        "trainable_params": sum(l.B.numel() for l in order),
        "adapted_layers": len(order),
        "basis_seconds": round(basis_seconds, 2),
        **run_costs(loop_seconds, cfg.steps - start_step, t_start),
        "bits": cfg.bits,
        "device": str(device),
        "fused": fused,
        "examples_per_step": per_rank * ranks.world_size,
        **({"prefix_cache": cache.stats()} if cache is not None else {}),
        "eval_batch_size": cfg.eval_batch_size,
        **tune_peak_summary(tune_meter.stop("final eval"), yardstick, probe.input_ids.shape),
    }
    if main:
        _write_json(run.path / "summary.json", summary)
    distributed.shutdown(ranks)
    summary["output"] = str(run.path) if main else f"written by rank 0 (this is rank {ranks.rank})"
    return summary


# --------------------------------------------------------------------------- helpers


def _ort_loss(model, task, layers, splits, model_folder, device, bits):
    """``--backend ort``: the loss graph of these adapters in ONNX Runtime (exported once, cached)."""
    from ..onnx.loss_graph import build_ort_loss

    return build_ort_loss(model, task, layers, task.collate(splits.train[:2]), model_folder, device, bits)


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


def run_costs(loop_seconds: float, steps_run: int, t_start: float) -> dict:
    """Time and peak-memory fields every method's summary.json shares."""
    return {
        "train_seconds_this_run": round(loop_seconds, 2),
        "seconds_per_step": round(loop_seconds / max(steps_run, 1), 3),
        "wall_seconds_this_run": round(time.time() - t_start, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": peak_cuda_bytes(),
    }


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
    if "test" in summary:
        lines.append(f"test: {_fmt_metrics(summary['test'])} ({summary['test']['examples']} examples)")
    if summary.get("method", "zoact") != "zoact":
        lines.append(f"method: {summary['method']}  ({summary['forwards']} forwards)")
    lines.append(f"steps: {summary['steps']}  ({summary['seconds_per_step']:.2f} s/step)  "
                 f"wall time this run: {summary['wall_seconds_this_run']:.0f} s")
    lines.append(f"peak memory: RSS {fmt_bytes(summary['peak_rss_bytes'])}"
                 + (f", CUDA {fmt_bytes(summary['peak_cuda_bytes'])}" if summary["peak_cuda_bytes"] else ""))
    if describe_tune_peak(summary):
        lines.append(describe_tune_peak(summary))
    return "\n".join(lines)
