"""The optimizer and learning-rate schedule every training method steps with (ZO-Act, MeZO, LoRA).

The schedule is a pure function of the step, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math

import torch

from ..config import TuneConfig


def make_optimizer(params, cfg: TuneConfig) -> torch.optim.Optimizer:
    cfg = cfg.resolved()  # the method's default lr when --lr was not given
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
