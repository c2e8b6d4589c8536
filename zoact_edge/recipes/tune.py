"""``tune``: a TuneConfig in, a finished run folder and its summary out.

It settles the config once (method defaults, the rules between options, a device profile), claims
the run folder (a new one, or the one ``--resume`` continues), loads the model and the task, runs the
method's recipe on them and finishes the folder: ``summary.json`` written, an ``--overwrite`` swapped
into place.
"""

from __future__ import annotations

import contextlib
import os
import time

from .. import rundir
from ..config import TuneConfig
from ..errors import UserError
from ..profiling.fit import apply_profile
from ..zo import distributed
from .baselines import tune_baseline
from .calibrate import tune_calibrate
from .harness import describe, load_inputs
from .zoact import tune_zoact

__all__ = ["tune", "describe"]


def tune(cfg: TuneConfig, resume: str | None = None) -> dict:
    t_start = time.time()
    cfg = cfg.resolved()
    cfg.validate(resume)
    if cfg.profile:  # bits / batch / length / rank lowered until the estimate fits the profile's budget
        cfg = apply_profile(cfg)
        cfg.validate(resume)  # what the profile chose must still go together (--backend ort: --bits 4 or 32)
    if cfg.method not in ("zoact", "subspace") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--method {cfg.method} runs in one process; torchrun is for zoact and subspace")
    ranks = distributed.init_from_env(cfg.device)  # under torchrun: this process's rank; else rank 0 of 1
    if cfg.backend != "torch" and ranks.active:
        raise UserError(f"--fused, --accum-steps and torchrun need --backend torch (not {cfg.backend})")
    if not ranks.is_main:  # other ranks never write: every write is the main rank's
        claimed = contextlib.nullcontext()
    elif resume:
        claimed = rundir.claim_existing(resume, f"--resume {resume}")
    else:
        claimed = rundir.claim(cfg.output, cfg.task, cfg.overwrite)
    with claimed as run:  # owned and locked; removed again if the run fails before its first checkpoint
        inputs = load_inputs(cfg)
        if run and not resume:
            run.write_json("run_config.json", {**cfg.to_dict(), "model_folder": inputs.loaded.folder})
        if cfg.method == "calibrate":  # the prior-only baseline: no weights change
            summary = tune_calibrate(cfg, inputs, run, t_start)
        elif cfg.method in ("mezo", "fo-lora"):  # the baselines: same data, eval and outputs, own loop
            summary = tune_baseline(cfg, inputs, run, t_start)
        else:
            summary = tune_zoact(cfg, inputs, run, ranks, resume, t_start)
        if run:
            run.write_json("summary.json", summary)
            run.commit()  # complete: an --overwrite run replaces the old one now at the latest
    summary["output"] = str(run.final) if run else f"written by rank 0 (this is rank {ranks.rank})"
    return summary

