"""The optimizer and learning-rate schedule every training method steps with (ZO-Act, MeZO, LoRA).

The schedule is a pure function of the step, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math

import torch

from ..config import TuneConfig


def make_optimizer(params, cfg: TuneConfig, lr_scales: list[float] | None = None) -> torch.optim.Optimizer:
    """Adam or SGD over ``params``; ``lr_scales`` (one per tensor, ``--step-scale weight``) gives each its own
    lr as a multiple of the run's (:func:`set_lr` keeps the multiples).

    A scale c is the reparametrisation B = c B~ with B~ trained at the run's lr and eps: the direction is
    drawn as c Z (``z_scale``), so the estimate for B, c p Z, is c times B~'s, p Z. B must then move c times
    B~'s step. Adam takes the factor c out of its step (the step does not depend on the gradient's scale), so
    the layer's lr is c times the run's; SGD's step, lr c p Z, already is c times B~'s, so its lr stays the run's.
    """
    cfg = cfg.resolved()  # the method's default lr when --lr was not given
    params = list(params)
    groups: list = [{"params": params}]
    if lr_scales is not None and cfg.optimizer == "adam":
        if len(lr_scales) != len(params):
            raise ValueError(f"{len(lr_scales)} lr scales for {len(params)} tensors")
        groups = [{"params": [p], "lr_scale": s} for p, s in zip(params, lr_scales)]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    set_lr(opt, cfg.lr)
    return opt


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
    """The run's lr (after the schedule); each tensor's group takes its multiple of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
