"""``tune``: a TuneConfig in, a finished run folder and its summary out. Picks the recipe of the method."""

from __future__ import annotations

from ..config import TuneConfig
from ..errors import UserError
from ..profiling.fit import apply_profile
from .baselines import tune_baseline
from .calibrate import tune_calibrate
from .harness import describe
from .zoact import tune_zoact

__all__ = ["tune", "describe"]


def tune(cfg: TuneConfig, resume: str | None = None) -> dict:
    cfg = cfg.resolved()
    cfg.validate()
    if cfg.profile:  # bits / batch / length / rank lowered until the estimate fits the profile's budget
        cfg = apply_profile(cfg)
        cfg.validate()  # what the profile chose must still go together (--backend ort: --bits 4 or 32)
    if cfg.method == "calibrate":  # the prior-only baseline: no weights change
        if resume:
            raise UserError("--resume: calibrate runs take no steps, so there is nothing to resume")
        return tune_calibrate(cfg)
    if cfg.method in ("mezo", "fo-lora"):  # the baselines: same data, eval and outputs, own loop
        if resume:
            raise UserError(f"--resume: {cfg.method} runs are baselines and are not resumable (only zoact and "
                            f"subspace are)")
        return tune_baseline(cfg)
    return tune_zoact(cfg, resume)
