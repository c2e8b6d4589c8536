"""The ZO-Act recipe (``--method zoact``, and ``subspace``, its random-basis ablation), top to bottom.

setup:  (the model and task, loaded by ``tune``) -> pick target layers -> one-shot bases (or resume) -> adapters
        -> loss engine (torch or ONNX Runtime) -> zero-shot eval
loop:   ZO steps (forward pairs only, under inference mode), checkpoints, periodic evals
finish: final eval -> PEFT adapter + checkpoint + summary.

Everything random is derived from ``(seed, step, ...)`` (:func:`zoact_edge.seeds.derive_seed`), so
a run resumed from a checkpoint replays exactly the batches and directions it would have seen.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import rundir
from ..adapters import files as adapter_files
from ..adapters import targets as tgt
from ..adapters.build import build_adapters, inject_adapters
from ..adapters.compensate import compensate_from
from ..adapters.subspace import fold_and_resample
from ..config import TuneConfig
from ..data.tasks import sampled_batches, scored_mask
from ..errors import UserError
from ..memory import release_free_memory
from ..profiling.fit import check_batch_fits
from ..profiling.meter import Yardstick
from ..seeds import derive_seed
from ..zo import distributed, perturb
from ..zo.engine import LossEngine, TorchEngine
from ..zo.estimator import fused_by_default
from ..zo.prefix import PrefixCache
from ..zo.schedule import make_optimizer, set_lr
from .harness import Inputs, fmt_metrics, run_costs, run_summary, train_loop

log = logging.getLogger(__name__)
CALIBRATION_TAG = 0xCA11B  # the calibration examples' draw, apart from every other seeded stream of the run
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tune_zoact(cfg: TuneConfig, inputs: Inputs, run: rundir.RunDir | None, ranks: distributed.Ranks,
               resume: str | None, t_start: float) -> dict:
    """The run on ``inputs`` in ``run``'s folder (None on the ranks that do not write); returns the summary
    (``tune`` writes it)."""
    main = ranks.is_main  # only the main rank writes files
    # ---- setup: targets; refuse a batch that cannot fit before any forward
    model, device, task, splits = inputs.model, inputs.device, inputs.task, inputs.splits
    found = tgt.find_targets(model, cfg.targets, cfg.layers)
    tgt.check_rank(found, cfg.rank)
    default = fused_by_default(device.type)  # fit's activation coefficients assume this step
    fused = cfg.fused_step(default)
    pairs = cfg.queries if cfg.fuse_queries else 1  # rows held per example beyond the default step
    check_batch_fits(model.config, found, cfg, device, pairs if default else (2 * pairs if fused else 1))
    dtype = DTYPES[cfg.adapter_dtype_on(device.type)]
    yardstick = Yardstick.measure(model, task, splits.train[:cfg.batch_size], cfg.max_length, device)

    # ---- adapters: fresh bases, or everything from the checkpoint
    energies: dict = {}  # each activation basis column's energy (--perturb whiten)
    groups: list = []  # the input groups of random bases (--resample-every draws new ones for them)
    if resume:
        state, P, B, opt_state = adapter_files.load_checkpoint(Path(resume))
        if set(P) != {t.name for t in found} or set(B) != set(P) or any(
                B[t.name].shape != (t.d_out, P[t.name].shape[1]) or P[t.name].shape[0] != t.d_in for t in found):
            raise UserError(f"--resume {resume}: the checkpoint's layers do not match this model/targets")
        layers = inject_adapters(model, found, P, B, dtype, device)
        start_step, zero_shot, basis_seconds = state["step"], state["zero_shot"], state["basis_seconds"]
        compensation = state.get("compensation")  # already in the checkpoint's B
        perturb.apply(layers, perturb.from_state(state.get("z_scales")))  # --step-scale's factor included
        lr_scales = state.get("lr_scales")
        if main:
            rundir.truncate_metrics(run.path, start_step)
    else:
        t0 = time.time()
        # in training batches: the calibration pass then peaks no higher than a ZO step
        batches = sampled_batches(task, splits.train, cfg.calib_samples, cfg.batch_size, cfg.seed, CALIBRATION_TAG,
                                  device)
        layers = build_adapters(
            model, batches, cfg.rank,
            "random" if cfg.method == "subspace" else cfg.basis_method, found=found, passes=cfg.basis_passes,
            seed=cfg.seed, dtype=dtype, device=device, groups=groups, energies=energies,
            token_mask=scored_mask if cfg.calib_tokens == "scored" else None,
            progress=lambda desc, it: tqdm(it, desc=desc, leave=False, unit="batch"))
        basis_seconds = time.time() - t0
        release_free_memory()
        yardstick.meter.split("basis")  # the yardstick's phases: see profiling.meter.tune_peak_summary
        scales = perturb.column_scales(cfg.perturb, layers, energies or None)
        lr_scales = None
        if cfg.step_scale == "weight":  # lr and eps relative to each layer's weight: B = c B~, B~ trained
            factors = perturb.weight_rms(layers)
            scales = perturb.times(scales, factors, layers)
            lr_scales = [factors[n] for n in layers]
        perturb.apply(layers, scales)
    # Built before anything is written: it refuses unsupported architectures.
    cache = PrefixCache(model, layers, cfg.cache_prefix_mb * 2**20) if cfg.cache_prefix else None  # across epochs
    engine = ENGINES[cfg.backend](cfg, inputs, layers, fused, cache, ranks)

    def run_eval(desc, examples=None) -> dict:
        metrics = engine.evaluate(inputs.eval_set if examples is None else examples, desc)
        release_free_memory()
        return metrics

    if not resume:
        zero_shot = run_eval("zero-shot eval")  # the model as loaded: before any compensation
        start_step, opt_state, compensation = 0, None, None
        # --bits 4 (torch backend) unless --no-compensate; then the start is evaluated: what it alone did
        if cfg.compensates and (count := compensate_from(layers, inputs.loaded.folder, cfg.compensate is True)):
            compensation = {"layers": count, "start": run_eval("compensated start eval")}
            log.info("started %d 4-bit layers' adapters at their rounding error inside the basis: %s", count,
                     fmt_metrics(compensation["start"]))
        yardstick.meter.split("zero-shot eval")
    order = list(layers.values())
    distributed.broadcast_adapters(ranks, order)  # all ranks start from rank 0's exact adapter
    optimizer = make_optimizer([l.B for l in order], cfg, lr_scales)
    if opt_state is not None:
        _load_optimizer_state(optimizer, opt_state, resume)

    def checkpoint(step):
        if not main:
            return
        state = {"step": step, "zero_shot": zero_shot, "basis_seconds": basis_seconds, "config": cfg.to_dict(),
                 "compensation": compensation,
                 "z_scales": perturb.to_state(layers), "lr_scales": lr_scales}
        adapter_files.save_checkpoint(run.path, layers, optimizer, state)
        run.commit()  # an --overwrite run replaces the old one at its first checkpoint

    # ---- loop: every loss evaluation is forward-only, under inference mode
    per_rank = cfg.batch_size * cfg.accum_steps
    forwards_per_step = 2 * cfg.queries * cfg.accum_steps * ranks.world_size  # batch-sized forwards, all ranks
    folded: dict = {}  # subspace resampling: earlier (P, B) pairs, already merged into the weights
    # Testing hook: die by SIGKILL at the start of this step, like a crash or an OOM kill.
    kill_at = int(os.environ.get("ZOACT_KILL_AT_STEP", "0"))

    def zo_step(step: int, idx: list, lr: float):
        if step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        idx = idx[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]  # this rank's slice of the step's examples
        micro = [task.collate([splits.train[i] for i in idx[s:s + cfg.batch_size]])  # accum_steps micro-batches
                 .with_example_ids(idx[s:s + cfg.batch_size]).to(device)  # the --cache-prefix keys
                 for s in range(0, per_rank, cfg.batch_size)]
        set_lr(optimizer, lr)
        if cfg.resample_every and step and step % cfg.resample_every == 0:
            fold_and_resample(layers, groups, cfg.rank, cfg.seed, step // cfg.resample_every, folded)
            optimizer.state.clear()  # Adam moments of the old coordinates mean nothing now
        res = engine.step(micro, derive_seed(cfg.seed, step), optimizer)
        return (res.loss if res.finite else None), {"projected_grad": res.projected}

    def after_step(done: int):
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            checkpoint(done)

    loop_seconds = train_loop(
        cfg, inputs, zo_step, run_eval, metrics_path=run.path / "metrics.jsonl" if main else None, desc="zo-act",
        examples_per_step=per_rank * ranks.world_size, forwards_per_step=forwards_per_step, t_start=t_start,
        start_step=start_step, after_step=after_step, show=main)
    yardstick.meter.split("steps")

    # ---- finish: final evaluation and outputs
    final = run_eval("final eval")
    test = run_eval("test eval", splits.test) if cfg.test_eval else None
    if main:
        adapter_files.save_peft(run.path, layers, inputs.loaded.folder, folded)
    checkpoint(cfg.steps)
    costs = run_costs(loop_seconds, cfg.steps - start_step, t_start)
    summary = run_summary(
        cfg, zero_shot, final, test, forwards_per_step=forwards_per_step,
        trainable_params=sum(l.B.numel() for l in order),
        adapted_layers=len(order), basis_seconds=basis_seconds, costs=costs, device=device, fused=fused,
        examples_per_step=per_rank * ranks.world_size, peaks=yardstick.summary("final eval"),
        **({"prefix_cache": cache.stats()} if cache is not None else {}),
        **({"compensation": compensation} if compensation else {}), eval_batch_size=cfg.eval_batch_size)
    distributed.shutdown(ranks)
    return summary


# --------------------------------------------------------------------------- the loss engines


def _torch_engine(cfg: TuneConfig, inputs: Inputs, layers: dict, fused: bool, cache, ranks) -> LossEngine:
    return TorchEngine(inputs.model, inputs.task, layers, cfg.eps, cfg.queries, fused, cfg.fuse_queries,
                       cfg.share_prefix, cache, distributed.loss_reducer(ranks, inputs.device), cfg.eval_batch_size,
                       inputs.device)


def _ort_engine(cfg: TuneConfig, inputs: Inputs, layers: dict, fused: bool, cache, ranks) -> LossEngine:
    """``--backend ort``: the loss graph of these adapters in ONNX Runtime (exported once, cached);
    evaluations run the (possibly int4) graph too."""
    from ..onnx.ort_engine import OrtEngine, build_ort_loss  # the onnx extra: imported only when asked for

    task = inputs.task
    loss = build_ort_loss(inputs.model, task, layers, task.collate(inputs.splits.train[:2]), inputs.loaded.folder,
                          inputs.device, cfg.bits)
    return OrtEngine(loss, task, cfg.eps, cfg.queries, cfg.eval_batch_size)


ENGINES = {"torch": _torch_engine, "ort": _ort_engine}


# --------------------------------------------------------------------------- helpers


def _load_optimizer_state(optimizer: torch.optim.Optimizer, opt_state: dict, resume: str) -> None:
    try:
        optimizer.load_state_dict(opt_state)
        if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape
               for p, st in optimizer.state.items() for v in st.values()):
            raise ValueError("moment shapes differ from the coefficients'")
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"--resume {resume}: the checkpoint's optimizer state does not fit this run ({e})") from None

