"""The ZO-Act layer: a frozen linear plus a low-rank path ``B (P^T x)``.

``P`` (d_in x r) is the one-shot activation basis and never changes; ``B`` (d_out x r) is the only
trained tensor and starts at zero, so a freshly wrapped model computes exactly what the base
model computes. The base layer (nn.Linear, GPT-2 Conv1D, bitsandbytes Linear4bit/Linear8bitLt)
is called as-is and never modified: quantized weights stay bit-identical.

ZO perturbations never write into ``B`` either. A layer can be told "add ``scale * Z``", where
``Z`` is drawn from a seed inside the forward, used, and dropped. That makes restore exact by
construction (there is nothing to undo), keeps no noise tensor alive between forwards, and lets
the optimizer regenerate the same ``Z`` from the same seed when it forms the gradient.

A layer can also be told "the batch is G copies of the same rows; group g gets ``B + s_g Z_g``"
(:meth:`ZOActLinear.set_noise_groups`). That is the fused +/- forward: the frozen base matmul
runs once over all G x N rows, and only the small adapter path differs per group.
"""

from __future__ import annotations

import torch
from torch import nn


def noise_like(B: torch.Tensor, seed: int) -> torch.Tensor:
    """The perturbation direction Z for ``B`` under ``seed``: N(0, 1), deterministic per device."""
    gen = torch.Generator(device=B.device)
    gen.manual_seed(seed)
    return torch.randn(B.shape, generator=gen, device=B.device, dtype=B.dtype)


class SharedProjection:
    """``x @ P`` computed once for the layers that share P and read the same x (q/k/v, gate/up).

    The first member computes ``h = x @ P`` and keeps (x, h) until every member has used it; the
    reference to x keeps its identity from being recycled meanwhile. Nothing outlives the group's
    turn in the forward, so no activations accumulate across layers.
    """

    __slots__ = ("members", "x", "h", "uses")

    def __init__(self, members: int):
        self.members = members
        self.x = self.h = None
        self.uses = 0

    def __call__(self, x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        if self.x is x:
            h = self.h
            self.uses += 1
            if self.uses >= self.members:
                self.x = self.h = None
            return h
        h = x.to(P.dtype) @ P
        if self.members > 1:
            self.x, self.h, self.uses = x, h, 1
        return h


class ZOActLinear(nn.Module):
    def __init__(self, base: nn.Module, P: torch.Tensor, B: torch.Tensor, shared: SharedProjection | None = None):
        super().__init__()
        self.base = base
        # Not persistent: the base model's state_dict stays the base model's; adapters are saved
        # separately (PEFT format / checkpoint), with shared bases written once.
        self.register_buffer("P", P, persistent=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.noise_seed: int | None = None
        self.noise_scale: float = 0.0
        self.noise_groups: tuple[tuple[int, float], ...] | None = None
        self.shared = shared
        # Per-column scale of the perturbation (length r), or None for plain N(0, I): see
        # zoact_edge/zo/perturb.py. Set once after the bases; the update regenerates the same Z.
        self.z_scale: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.P.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def set_noise(self, seed: int | None, scale: float = 0.0) -> None:
        self.noise_seed, self.noise_scale = seed, scale
        self.noise_groups = None

    def set_noise_groups(self, groups) -> None:
        """Rows form ``len(groups)`` equal consecutive blocks; block g sees ``B + scale_g * Z(seed_g)``.

        ``groups`` is a sequence of (seed, scale); None (or empty) clears it.
        """
        self.noise_seed, self.noise_scale = None, 0.0
        self.noise_groups = tuple((int(s), float(c)) for s, c in groups) if groups else None

    def direction(self, seed: int) -> torch.Tensor:
        """The perturbation direction under ``seed``: N(0, I), columns scaled by ``z_scale`` if set."""
        z = noise_like(self.B, seed)
        return z if self.z_scale is None else z.mul_(self.z_scale)

    def delta_weight(self) -> torch.Tensor:
        """delta W = B P^T (d_out x d_in), the dense update a LoRA merge adds to W."""
        return self.B @ self.P.T.to(self.B.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared(x, self.P)
        return x.to(self.P.dtype) @ self.P

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.noise_groups is not None:
            return out + self._grouped_low(self.project(x)).to(out.dtype)
        coeff = self.B
        if self.noise_seed is not None and self.noise_scale != 0.0:
            coeff = coeff + self.noise_scale * self.direction(self.noise_seed)
        h = self.project(x)
        low = h @ coeff.T.to(h.dtype)  # B is fp32 (the trained master copy); the matmul runs in P's dtype
        return out + low.to(out.dtype)

    def _grouped_low(self, h: torch.Tensor) -> torch.Tensor:
        """``h @ (B + s_g Z_g)^T`` per row group, as one batched matmul.

        Each group's coefficients are formed by the very expression the unfused forward uses, so a
        fused group computes what a separate forward computes (up to GEMM rounding), at the same
        cost as the unfused adapter path: G small (d_out x r) coefficient matrices are built,
        B is only read. Rows are grouped batch-major, so ``h`` may be (rows, ..., r) of any rank.
        """
        groups = self.noise_groups
        G = len(groups)
        if h.shape[0] % G:
            raise RuntimeError(f"fused forward: {h.shape[0]} rows do not split into {G} perturbation groups")
        drawn: dict[int, torch.Tensor] = {}
        coeffs = []
        for seed, scale in groups:
            if seed not in drawn:  # the + and - groups of a query share one draw of Z
                drawn[seed] = self.direction(seed)
            coeffs.append(self.B + scale * drawn[seed])
        stacked = torch.stack(coeffs)  # (G, d_out, r)
        low = torch.bmm(h.reshape(G, -1, h.shape[-1]), stacked.transpose(1, 2).to(h.dtype))
        return low.reshape(*h.shape[:-1], stacked.shape[1])
