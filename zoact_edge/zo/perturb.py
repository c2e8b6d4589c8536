"""Perturbation scaling (``--perturb``): the distribution each adapter's direction Z is drawn from.

Every layer draws Z ~ N(0, I) of B's shape (d_out x r) from its seed; a scaling multiplies
column j of Z by ``D_j`` (see :meth:`zoact_edge.adapters.layer.ZOActLinear.direction`). The forward adds
``eps * Z D`` and the update regenerates the same ``Z D``, so the estimate is
``g = projected * Z D`` with E[g] = D^2 * dL/dB column-wise: SGD then steps along D^2 times the
gradient. Adam divides each coordinate by its own RMS (which also scales with D_j), so under Adam
the same scaling acts as D, not D^2, on the step's mean, while every coordinate still moves about lr:
a D that is not constant then only lowers the descent at the same noise (docs/results.md, "Why a
column scaling cannot help under Adam"). A constant D only rescales eps (and, under SGD, lr).

* ``plain``: D = 1 (the paper's N(0, I)).
* ``rank``: D = 1/sqrt(r), so the total perturbation norm does not grow with the rank.
* ``layer-norm``: D = sqrt(d_in / r), so ``||Z D P^T||_F`` matches, in expectation, the norm of a
  full-weight (MeZO) perturbation of the same layer: lr and eps then mean the same per layer as
  for a weight-space method, whatever the rank.
* ``whiten``: D_j = sigma_0 / sigma_j, sigma_j the RMS of P_j^T x over the calibration tokens.
  The curvature of the loss along column j scales with sigma_j^2 (the input energy along P_j),
  so under SGD this scaling equalises it (exactly, for a quadratic in the adapter output); the
  top column keeps D = 1. Needs the activation bases' energies (``--method zoact``).

``--step-scale weight`` multiplies any of these by the layer's weight RMS (:func:`weight_rms`), and the
optimizer's lr for the layer with it (:func:`zoact_edge.zo.schedule.make_optimizer`).
"""

from __future__ import annotations

import math

import torch

from ..adapters.layer import ZOActLinear
from ..adapters.targets import dense_weight
from ..errors import UserError

KINDS = ("plain", "rank", "layer-norm", "whiten")
ENERGY_FLOOR = 1e-12  # relative to the top column: a dead column gets a large but finite scale


def column_scales(kind: str, layers: dict[str, ZOActLinear], energies: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor | None]:
    """``{layer name: D}`` (length r, fp32 on CPU) for ``kind``; None for ``plain``."""
    if kind not in KINDS:
        raise UserError(f"--perturb {kind!r}: choose one of {', '.join(KINDS)}")
    out: dict[str, torch.Tensor | None] = {}
    for name, layer in layers.items():
        r, d_in = layer.B.shape[1], layer.in_features
        if kind == "plain":
            out[name] = None
        elif kind == "rank":
            out[name] = torch.full((r,), 1.0 / math.sqrt(r))
        elif kind == "layer-norm":
            out[name] = torch.full((r,), math.sqrt(d_in / r))
        else:
            if energies is None or name not in energies:
                raise UserError("--perturb whiten needs the activation bases' energies: use it with --method zoact")
            e = energies[name].double()
            out[name] = (e[0] / e.clamp(min=float(e[0]) * ENERGY_FLOOR)).sqrt().float()
    return out


@torch.no_grad()
def weight_rms(layers: dict[str, ZOActLinear]) -> dict[str, float]:
    """``{layer name: RMS of its frozen weight W}`` (``--step-scale weight``), W as the layer computes with it
    (a 4-bit weight dequantized). Training B with lr and eps both times c = RMS(W) is training B~ = B / c with
    lr and eps: the layer computes ``W x + c B~ P^T x``, which a rescaling of W and of its input leaves unchanged
    (W -> a W moves c -> a c), so the run does not depend on the scale a model keeps its weights at."""
    return {name: float(dense_weight(layer.base).square().mean().sqrt()) for name, layer in layers.items()}


def times(scales: dict[str, torch.Tensor | None], factors: dict[str, float], layers: dict[str, ZOActLinear]
          ) -> dict[str, torch.Tensor]:
    """Every layer's column scale times its factor (a ``plain`` layer's scale becomes the constant factor)."""
    return {name: (torch.ones(layer.B.shape[1]) if scales.get(name) is None else scales[name]) * factors[name]
            for name, layer in layers.items()}


def apply(layers: dict[str, ZOActLinear], scales: dict[str, torch.Tensor | None]) -> None:
    """Give each layer its column scale (on the layer's device and dtype)."""
    for name, layer in layers.items():
        D = scales.get(name)
        layer.z_scale = None if D is None else D.to(device=layer.B.device, dtype=layer.B.dtype)


def to_state(layers: dict[str, ZOActLinear]) -> dict[str, list[float]]:
    """The layers' scales as JSON-ready lists (checkpoint state): a resumed run draws the same Z."""
    return {name: l.z_scale.float().cpu().tolist() for name, l in layers.items() if l.z_scale is not None}


def from_state(state: dict[str, list[float]] | None) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(v, dtype=torch.float32) for name, v in (state or {}).items()}
