"""Attaching ZO-Act adapters to a model. :func:`build_adapters` is the one public way:

    targets (which linears) -> one-shot bases from calibration batches (or random ones) -> wrap each.

:func:`inject_adapters` is its last step alone, for adapters whose bases (and coefficients) already
exist: a resumed checkpoint, a saved PEFT adapter.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable

import torch

from ..data.tasks import hidden_states
from . import targets as tgt
from .basis import BasisConfig, compute_bases
from .layer import SharedProjection, ZOActLinear
from .subspace import input_groups, random_bases

BASES = ("auto", "gram", "sketch", "random")  # activation bases (basis.py), or random ones (subspace.py)


def forward_only(model, batch) -> None:
    """One calibration forward: the hidden states only, under inference mode."""
    with torch.inference_mode():
        hidden_states(model, batch)


def build_adapters(model, batches: list, rank: int, basis: str = "auto", *, targets: str | None = None,
                   layers: str | None = None, found: list[tgt.Target] | None = None, passes: int = 3, seed: int = 0,
                   dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                   token_mask: Callable | None = None, energies: dict | None = None, groups: list | None = None,
                   progress: Callable[[str, Iterable], Iterable] | None = None) -> dict[str, ZOActLinear]:
    """Wrap the target linears of ``model`` in fresh adapters (B = 0) and return ``{name: layer}``.

    ``basis``: ``auto``/``gram``/``sketch`` compute each input group's top-``rank`` activation basis
    from ``batches`` (see :func:`~zoact_edge.adapters.basis.compute_bases`; ``passes``, ``token_mask``
    and ``energies`` go there); ``random`` draws seeded random orthonormal bases per input group,
    found by one forward of ``batches[0]``. ``found`` (from :func:`~zoact_edge.adapters.targets.find_targets`)
    overrides ``targets`` / ``layers``. ``groups``, if given, is filled with the input groups of a
    random basis (resampling draws new bases for the same groups).
    """
    if basis not in BASES:
        raise ValueError(f"basis {basis!r}: choose one of {', '.join(BASES)}")
    found = found if found is not None else tgt.find_targets(model, targets, layers)
    modules = {t.name: model.get_submodule(t.name) for t in found}
    d_in = {t.name: t.d_in for t in found}
    if basis == "random":
        detected = input_groups(modules, lambda: forward_only(model, batches[0]))
        bases = random_bases(detected, d_in, rank, seed)
        if groups is not None:
            groups.extend(detected)
    else:
        bases = compute_bases(modules, d_in, batches, lambda b: forward_only(model, b),
                              BasisConfig(rank=rank, method=basis, passes=passes, seed=seed),
                              progress=progress, token_mask=token_mask, energies=energies)
    return inject_adapters(model, found, bases, None, dtype, device)


def inject_adapters(model, found: list[tgt.Target], bases: dict, coeffs: dict | None, dtype, device) -> dict:
    """Wrap every target; group members keep sharing one P tensor (and its x @ P) after the move.

    ``device=None`` puts each adapter on its base layer's device, so a model sharded over GPUs
    with accelerate's ``device_map="auto"`` gets its adapters next to the weights they adapt.

    ``dtype`` is that of the bases and the adapter's matmuls. The coefficients B are the trained
    tensor and stay fp32 (fp64 with fp64 bases): the optimizer steps an fp32 master copy. (fp16 B
    under Adam turned every loss non-finite from the second step on CUDA: an Adam second moment
    0.001 g^2 underflows to 0 in fp16 for |g| < 8e-3, and fp16 has no room for eps = 1e-8.)
    """
    place = {t.name: device if device is not None else next(model.get_submodule(t.name).parameters()).device
             for t in found}
    members = collections.Counter((id(bases[t.name]), place[t.name]) for t in found)
    coeff_dtype = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 where the bases are fp64
    moved: dict[tuple, tuple[torch.Tensor, SharedProjection]] = {}
    for t in found:
        P, dev = bases[t.name], place[t.name]
        P_dev, shared = moved.setdefault((id(P), dev), (P.to(device=dev, dtype=dtype),
                                                        SharedProjection(members[id(P), dev])))
        B = (coeffs[t.name].to(device=dev, dtype=coeff_dtype) if coeffs else
             torch.zeros(t.d_out, P.shape[1], device=dev, dtype=coeff_dtype))
        tgt.wrap(model, t.name, P_dev, B, shared)
    return tgt.adapters(model)
