"""The ZO-Act step: a two-point, forward-only gradient estimate in the adapter coefficients.

For coefficients B (all adapters together) and a direction Z ~ N(0, I) drawn from a seed:

    g = (L(B + eps Z) - L(B - eps Z)) / (2 eps) * Z

is an unbiased estimate (up to O(eps^2)) of the gradient of the Gaussian-smoothed loss, i.e. of
dL/dB for small eps. With ``queries`` > 1 the estimates of independent directions are averaged.

Nothing here knows about training frameworks: ``loss_fn`` is any zero-argument callable that runs
a forward and returns the loss as a float. ``Z`` never exists as a stored tensor: each layer draws
its slice from ``seed`` inside the forward, and :func:`write_gradients` draws it again to form g.
The result lands in ``B.grad`` so that any ``torch.optim`` optimizer can take the step.

:func:`estimate_batches` is the general form the training loop uses: losses combined exactly
from per-example (sum, count) terms of several micro-batches and ranks, and the perturbed
forwards optionally fused (the + and - halves, or all 2q perturbations, as row groups of one
wider forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..adapters.layer import ZOActLinear
from ..seeds import derive_seed


def layer_seed(query_seed: int, index: int) -> int:
    return derive_seed(query_seed, index)


@dataclass
class ZOResult:
    loss_plus: list[float]
    loss_minus: list[float]
    projected: list[float]  # (L+ - L-) / (2 eps), one per query
    finite: bool

    @property
    def loss(self) -> float:
        """The training loss reported for the step: mean of the +/- losses."""
        return float(np.mean(self.loss_plus + self.loss_minus))


def _set_noise(layers: Sequence[ZOActLinear], query_seed: int | None, scale: float) -> None:
    for i, layer in enumerate(layers):
        layer.set_noise(None if query_seed is None else layer_seed(query_seed, i), scale)


def estimate(
    layers: Sequence[ZOActLinear],
    loss_fn: Callable[[], float],
    step_seed: int,
    eps: float,
    queries: int = 1,
) -> ZOResult:
    """Evaluate the 2*queries perturbed losses; B itself is never written."""
    lp, lm, proj = [], [], []
    try:
        for q in range(queries):
            qs = derive_seed(step_seed, q)
            _set_noise(layers, qs, +eps)
            plus = float(loss_fn())
            _set_noise(layers, qs, -eps)
            minus = float(loss_fn())
            lp.append(plus)
            lm.append(minus)
            proj.append((plus - minus) / (2.0 * eps))
    finally:
        _set_noise(layers, None, 0.0)
    finite = all(math.isfinite(v) for v in lp + lm)
    return ZOResult(lp, lm, proj, finite)


@torch.no_grad()
def write_gradients(layers: Sequence[ZOActLinear], result: ZOResult, step_seed: int) -> None:
    """Set ``B.grad = mean_q projected_q * Z_q`` for every layer, regenerating Z from the seeds.

    Z is each layer's :meth:`~zoact_edge.adapters.layer.ZOActLinear.direction`, the very draw (with any
    column scaling) its forward added, so with a scaling D the step follows D^2 times the gradient.
    """
    queries = len(result.projected)
    for i, layer in enumerate(layers):
        grad = torch.zeros_like(layer.B)
        for q, coef in enumerate(result.projected):
            z = layer.direction(layer_seed(derive_seed(step_seed, q), i))
            grad.add_(z, alpha=coef / queries)
        layer.B.grad = grad


def apply_update(
    layers: Sequence[ZOActLinear], result: ZOResult, optimizer: torch.optim.Optimizer, step_seed: int
) -> None:
    """Regenerate g from the seed and let the optimizer step; a non-finite result skips the step."""
    if result.finite:
        write_gradients(layers, result, step_seed)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def zo_step(
    layers: Sequence[ZOActLinear],
    loss_fn: Callable[[], float],
    optimizer: torch.optim.Optimizer,
    step_seed: int,
    eps: float,
    queries: int = 1,
) -> ZOResult:
    """One full ZO-Act update. A non-finite loss skips the update (the result says so)."""
    result = estimate(layers, loss_fn, step_seed, eps, queries)
    apply_update(layers, result, optimizer, step_seed)
    return result


# --------------------------------------------------------------------------- batched estimate
#
# The general form of the step: the losses are combined from (sum, count) terms of any number of
# micro-batches (gradient accumulation) and ranks (data parallel), and the 2 * queries perturbed
# forwards may be fused into fewer, wider forwards. All of it shares the step's one seed, so the
# estimate equals the one a single large batch would give.

LossTerms = Callable[[object, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``loss_terms(batch, groups) -> (sums, counts)``: one forward of ``groups`` perturbation groups."""


def fused_by_default(device_type: str) -> bool:
    """Whether a step fuses its +/- forwards unless told otherwise: on CUDA, where the forward is
    bandwidth bound; not on compute-bound CPUs, where it saves little (tools/bench_step.py) and
    doubles activation memory. tune, profile and fit's coefficients all assume this rule."""
    return device_type == "cuda"


def forward_plan(queries: int, fused: bool, fuse_queries: bool) -> list[list[tuple[int, int]]]:
    """The forwards of one step, each a list of (query, sign) row groups.

    unfused: 2q forwards of one group; fused: q forwards of the (+, -) pair; fused queries: one
    forward of all 2q groups.
    """
    pairs = [[(q, +1), (q, -1)] for q in range(queries)]
    if not fused:
        return [[g] for pair in pairs for g in pair]
    if fuse_queries:
        return [[g for pair in pairs for g in pair]]
    return pairs


def _set_groups(layers: Sequence[ZOActLinear], groups: list[tuple[int, int]], step_seed: int, eps: float) -> None:
    if len(groups) == 1:  # a plain forward: the unfused path, exactly as estimate() runs it
        (q, sign), = groups
        _set_noise(layers, derive_seed(step_seed, q), sign * eps)
        return
    seeds = [derive_seed(step_seed, q) for q, _ in groups]
    for i, layer in enumerate(layers):
        layer.set_noise_groups([(layer_seed(qs, i), sign * eps) for qs, (_, sign) in zip(seeds, groups)])


@torch.no_grad()
def estimate_batches(
    layers: Sequence[ZOActLinear],
    loss_terms: LossTerms,
    batches: Sequence,
    step_seed: int,
    eps: float,
    queries: int = 1,
    fused: bool = False,
    fuse_queries: bool = False,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ZOResult:
    """The 2*queries perturbed losses over ``batches`` (this process's micro-batches).

    Every loss is ``sum of per-example terms / count`` over all micro-batches and, through
    ``all_reduce`` (a sum over ranks of one fp64 vector of 4*queries scalars), over all ranks.
    B is never written; the layers' noise is cleared whatever happens.
    """
    sums = torch.zeros(queries, 2, dtype=torch.float64)
    counts = torch.zeros(queries, 2, dtype=torch.float64)
    try:
        for groups in forward_plan(queries, fused, fuse_queries):
            _set_groups(layers, groups, step_seed, eps)
            for batch in batches:
                s, c = loss_terms(batch, len(groups))
                s, c = s.double().cpu(), c.double().cpu()
                for g, (q, sign) in enumerate(groups):
                    col = 0 if sign > 0 else 1  # column 0: B + eps Z, column 1: B - eps Z
                    sums[q, col] += s[g]
                    counts[q, col] += c[g]
    finally:
        _set_noise(layers, None, 0.0)
    if all_reduce is not None:
        reduced = all_reduce(torch.cat([sums.flatten(), counts.flatten()]))
        sums, counts = reduced[: 2 * queries].view(queries, 2), reduced[2 * queries:].view(queries, 2)
    losses = (sums / counts.clamp(min=1)).tolist()
    lp, lm = [l[0] for l in losses], [l[1] for l in losses]
    proj = [(p - m) / (2.0 * eps) for p, m in zip(lp, lm)]
    finite = all(math.isfinite(v) for v in lp + lm)
    return ZOResult(lp, lm, proj, finite)
