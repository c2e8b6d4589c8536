"""The ZO-Act step: a two-point, forward-only gradient estimate in the adapter coefficients.

For coefficients B (all adapters together) and a direction Z ~ N(0, I) drawn from a seed:

    g = (L(B + eps Z) - L(B - eps Z)) / (2 eps) * Z

is an unbiased estimate (up to O(eps^2)) of the gradient of the Gaussian-smoothed loss, i.e. of
dL/dB for small eps. With ``queries`` > 1 the estimates of independent directions are averaged.

Nothing here knows about training frameworks: ``loss_fn`` is any zero-argument callable that runs
a forward and returns the loss as a float. ``Z`` never exists as a stored tensor: each layer draws
its slice from ``seed`` inside the forward, and :func:`write_gradients` draws it again to form g.
The result lands in ``B.grad`` so that any ``torch.optim`` optimizer can take the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .layer import ZOActLinear, noise_like


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (run seed, step, query, layer): stateless, so resume is exact."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(a) << 30) ^ int(b)


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
    """Set ``B.grad = mean_q projected_q * Z_q`` for every layer, regenerating Z from the seeds."""
    queries = len(result.projected)
    for i, layer in enumerate(layers):
        grad = torch.zeros_like(layer.B)
        for q, coef in enumerate(result.projected):
            z = noise_like(layer.B, layer_seed(derive_seed(step_seed, q), i))
            grad.add_(z, alpha=coef / queries)
        layer.B.grad = grad


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
    if result.finite:
        write_gradients(layers, result, step_seed)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result
