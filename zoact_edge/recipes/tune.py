"""``tune``: a TuneConfig in, a finished run folder and its summary out.

It settles the config once (method defaults, the rules between options, a device profile), claims
the run folder (a new one, or the one ``--resume`` continues), runs the method's recipe in it and
finishes the folder: ``summary.json`` written, an ``--overwrite`` swapped into place.
"""

from __future__ import annotations

import os
import time

from .. import rundir
from ..config import TuneConfig
from ..errors import UserError
from ..profiling.fit import apply_profile
from ..zo import distributed
from .baselines import tune_baseline
from .calibrate import tune_calibrate
from .harness import describe
from .zoact import tune_zoact

__all__ = ["tune", "describe"]


def tune(cfg: TuneConfig, resume: str | None = None) -> dict:
    t_start = time.time()
    cfg = cfg.resolved()
    cfg.validate()
    if cfg.profile:  # bits / batch / length / rank lowered until the estimate fits the profile's budget
        cfg = apply_profile(cfg)
        cfg.validate()  # what the profile chose must still go together (--backend ort: --bits 4 or 32)
    _check_resume_and_ranks(cfg, resume)
    ranks = distributed.init_from_env(cfg.device)  # under torchrun: this process's rank; else rank 0 of 1
    if cfg.backend != "torch" and ranks.active:
        raise UserError(f"--fused, --accum-steps and torchrun need --backend torch (not {cfg.backend})")
    if not ranks.is_main:  # never writes: every write is main-rank only
        summary = tune_zoact(cfg, None, ranks, resume, t_start)
        summary["output"] = f"written by rank 0 (this is rank {ranks.rank})"
        return summary
    claimed = rundir.claim_existing(resume, f"--resume {resume}") if resume else rundir.claim(cfg.output, cfg.task,
                                                                                               cfg.overwrite)
    with claimed as run:  # owned and locked; removed again if the run fails before its first checkpoint
        if cfg.method == "calibrate":  # the prior-only baseline: no weights change
            summary = tune_calibrate(cfg, run, t_start)
        elif cfg.method in ("mezo", "fo-lora"):  # the baselines: same data, eval and outputs, own loop
            summary = tune_baseline(cfg, run, t_start)
        else:
            summary = tune_zoact(cfg, run, ranks, resume, t_start)
        run.write_json("summary.json", summary)
        run.commit()  # complete: an --overwrite run replaces the old one now at the latest
    summary["output"] = str(run.final)
    return summary


def _check_resume_and_ranks(cfg: TuneConfig, resume: str | None) -> None:
    """What only the zoact recipe (zoact, subspace) can do: resume from a checkpoint, run under torchrun."""
    if cfg.method in ("zoact", "subspace"):
        if cfg.resample_every and resume:
            raise UserError("--resample-every runs need --backend torch and cannot be resumed (the folded weights "
                            "are not checkpointed)")
        return
    if resume and cfg.method == "calibrate":
        raise UserError("--resume: calibrate runs take no steps, so there is nothing to resume")
    if resume:
        raise UserError(f"--resume: {cfg.method} runs are baselines and are not resumable (only zoact and subspace "
                        f"are)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--method {cfg.method} runs in one process; torchrun is for zoact and subspace")
