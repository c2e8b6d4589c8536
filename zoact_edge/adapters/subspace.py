"""Random-subspace bases: the ablation that isolates ZO-Act's activation basis.

``--method subspace`` runs the very same estimator, layers and optimizer as ZO-Act, but each
basis P is a random orthonormal d_in x r matrix instead of the top singular directions of the
layer's inputs (the random-subspace ZO family: LOZO, SubZero). Any accuracy gap between the two
methods at equal forwards is then due to the basis alone.

Bases are drawn per input group (q/k/v share one, gate/up share one), the grouping ZO-Act uses,
so both methods also cost the same per forward.

With ``--resample-every k`` a fresh basis is drawn every k steps, as the random-subspace papers
do. The coefficients learned so far are first folded into the frozen weights (W += B P^T, which
needs 16/32-bit weights), B restarts at zero and the optimizer state is cleared. The folded pairs
are kept (on CPU, r x (d_in + d_out) each) so that the saved adapter is still an exact LoRA of
the original weights: its rank is r times the number of bases used.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from ..seeds import derive_seed
from .basis import detect_groups
from .layer import ZOActLinear
from .targets import is_conv1d, is_quantized

RANDOM_BASIS_TAG = 0x5B5  # keeps these draws apart from every other seeded stream of the run


def random_basis(d_in: int, rank: int, seed: int) -> torch.Tensor:
    """A d_in x rank matrix with orthonormal columns, uniformly distributed (QR of a Gaussian)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(d_in, rank, generator=gen, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diagonal(R))).float().contiguous()  # sign fix: Haar, not QR-biased


def input_groups(modules: dict[str, nn.Module], run_forward: Callable[[], None]) -> list[list[str]]:
    """Groups of layers that read the same input, found by one forward (see basis.detect_groups)."""
    return detect_groups(modules, run_forward)


def random_bases(
    groups: list[list[str]], d_in: dict[str, int], rank: int, seed: int, draw: int = 0
) -> dict[str, torch.Tensor]:
    """``{layer name: P}``; members of a group share one tensor. ``draw`` numbers the resamplings."""
    out = {}
    for g, names in enumerate(groups):
        P = random_basis(d_in[names[0]], rank, derive_seed(seed, RANDOM_BASIS_TAG, draw, g))
        for name in names:
            out[name] = P
    return out


def _float_weight(layer: ZOActLinear, name: str) -> torch.Tensor:
    w = layer.base.weight
    if is_quantized(w):
        raise UserError(f"--resample-every folds B P^T into the weights and needs --bits 16 or 32; {name} is quantized")
    return w


@torch.no_grad()
def fold_and_resample(layers: dict[str, ZOActLinear], groups: list[list[str]], rank: int, seed: int, draw: int,
                      history: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """W += B P^T for every layer, remember (P, B), then give each group a fresh basis and B = 0."""
    for name, layer in layers.items():
        w = _float_weight(layer, name)
        delta = layer.delta_weight()
        if is_conv1d(layer.base):  # GPT-2 stores W transposed (d_in x d_out)
            delta = delta.T
        w.add_(delta.to(w.dtype))
        history.setdefault(name, []).append((layer.P.detach().cpu().clone(), layer.B.detach().cpu().clone()))
    fresh = random_bases(groups, {n: l.in_features for n, l in layers.items()}, rank, seed, draw)
    moved: dict[int, torch.Tensor] = {}
    for name, layer in layers.items():
        P = fresh[name]
        layer.P = moved.setdefault(id(P), P.to(device=layer.P.device, dtype=layer.P.dtype))
        layer.B.zero_()
