"""One-shot activation bases: the top-r uncentred right singular vectors of each layer's inputs.

For ``y = W x`` the gradient dL/dW = sum_t g_t x_t^T lies in the row space of X (tokens x d_in),
so the top right singular directions of X are where a low-rank update can do the most. We need
the top-r eigenvectors of the uncentred second moment A = X^T X, with padding tokens masked out.

Layers that read the same tensor (q/k/v of one attention, gate/up of one MLP) get one shared
basis. Sharing is detected, not assumed from names: during calibration, consecutive calls whose
input is the very same tensor object form a group.

Two estimators, both streaming over calibration batches (no activation is ever stored):

* ``gram``: accumulate A exactly (d_in x d_in) and take ``eigh``. Exact; used for narrow layers.
* ``sketch``: randomized subspace iteration on A, streamed. Pass 1 accumulates Y = A Omega for a
  Gaussian Omega (d_in x k, k = r + oversampling) and orthonormalises it; each further pass
  accumulates Y = A Q; the last pass ends with a Rayleigh-Ritz step on Q^T A Q (k x k). Memory
  is d_in x k per group instead of d_in^2, at the cost of one calibration forward per pass.
  Activation spectra of trained LMs decay fast, so 3 passes match the exact subspace closely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import UserError


@dataclass
class BasisConfig:
    rank: int = 16
    method: str = "auto"  # auto | gram | sketch
    passes: int = 3  # calibration passes for the sketch (>= 2)
    oversample: int = 16
    gram_max_dim: int = 256  # auto: exact Gram when d_in <= this
    seed: int = 0


@dataclass
class _Group:
    members: list[str]
    d_in: int
    method: str
    acc: torch.Tensor | None = None  # Gram (d x d) or sketch accumulator (d x k)
    Q: torch.Tensor | None = None  # current sketch basis (d x k)
    tokens: int = 0
    device: torch.device = torch.device("cpu")  # where the group's layer runs: accumulators live there
    extras: dict = field(default_factory=dict)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y.double()).Q.float()


def _top_eigvecs(S: torch.Tensor, r: int) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(S.double())  # ascending
    return vecs[:, -r:].flip(-1).float()


def _module_device(module: nn.Module) -> torch.device:
    """Where the module's inputs will be (its weights' device); CPU if unknown or offloaded (meta)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device if t.device.type != "meta" else torch.device("cpu")
    return torch.device("cpu")


class _Collector:
    """Forward pre-hooks that feed each target's (masked) inputs to its group's accumulator."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.keep: torch.Tensor | None = None  # flat bool mask of the real tokens; None: all are real
        self.on_input: Callable[[str, torch.Tensor], None] | None = None
        self._handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            self.on_input(name, x)

        return hook

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """The batch's padding mask; a batch without padding keeps no mask, so no token is copied."""
        keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
        self.keep = None if keep is None or bool(keep.all()) else keep

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows of ``x`` as (tokens x d_in) fp32; a view of ``x`` when nothing is masked."""
        x = x.reshape(-1, x.shape[-1])
        if self.keep is not None:
            x = x[self.keep.to(x.device)]
        return x.float()


def detect_groups(modules: dict[str, nn.Module], run: Callable[[], None]) -> list[list[str]]:
    """Group modules whose consecutive calls receive the identical input tensor."""
    order: list[tuple[str, torch.Tensor]] = []
    last: dict = {"x": None}

    def on_input(name, x):
        same = last["x"] is x
        order.append((name, same))
        last["x"] = x  # holding one reference keeps its storage from being reused meanwhile

    col = _Collector(modules)
    col.on_input = on_input
    with col:
        run()
    last["x"] = None
    groups: list[list[str]] = []
    seen = set()
    for name, same in order:
        if name in seen:
            continue
        seen.add(name)
        if same and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = set(modules) - seen
    if missing:
        raise RuntimeError(f"calibration forward never reached {sorted(missing)[:3]}")
    return groups


def compute_bases(
    modules: dict[str, nn.Module],
    d_in: dict[str, int],
    batches: Iterable,
    forward: Callable[[object], None],
    cfg: BasisConfig,
    progress: Callable[[str], Iterable] | None = None,
    token_mask: Callable[[object], torch.Tensor] | None = None,
    energies: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Return ``{module name: P}`` (fp32, d_in x r, orthonormal columns); group members share P.

    ``batches`` is re-iterated once per pass; ``forward(batch)`` runs the model on one batch under
    inference mode. Each batch must have an ``attention_mask`` (padding is masked out).
    ``token_mask(batch)``, if given, chooses the tokens the bases are computed from instead of the
    attention mask (e.g. only the scored positions). ``energies``, if given, is filled with
    ``{module name: mean over tokens of (P^T x)^2}`` (length r): each column's activation energy.
    """
    batches = list(batches)
    if not batches:
        raise UserError("no calibration examples")
    groups_names = detect_groups(modules, lambda: forward(batches[0]))
    groups: list[_Group] = []
    for names in groups_names:
        d = d_in[names[0]]
        method = cfg.method
        if method == "auto":
            method = "gram" if d <= max(cfg.gram_max_dim, 2 * (cfg.rank + cfg.oversample)) else "sketch"
        if method not in ("gram", "sketch"):
            raise UserError(f"unknown basis method {cfg.method!r}; use auto, gram or sketch")
        groups.append(_Group(names, d, method))
    leader = {g.members[0]: g for g in groups}
    n_passes = max(2, cfg.passes) if any(g.method == "sketch" for g in groups) else 1

    gen = torch.Generator().manual_seed(cfg.seed)
    for g in groups:
        g.device = _module_device(modules[g.members[0]])
        if g.method == "sketch":
            k = min(g.d_in, cfg.rank + cfg.oversample)
            g.Q = torch.randn(g.d_in, k, generator=gen).to(g.device)  # Omega for pass 1

    col = _Collector({name: modules[name] for name in leader})
    for p in range(n_passes):
        last_pass = p == n_passes - 1

        def on_input(name, x, p=p):
            g = leader[name]
            if g.method == "gram" and p > 0:
                return
            X = col.tokens(x)
            if p == 0:
                g.tokens += X.shape[0]
            if g.acc.device != X.device:  # the layer runs elsewhere than its weights sit (offloading)
                g.device, g.acc = X.device, g.acc.to(X.device)
                g.Q = None if g.Q is None else g.Q.to(X.device)
            g.acc.addmm_(X.T, X if g.method == "gram" else X @ g.Q)

        # The accumulators live through the whole pass: allocate them all before its forwards, not
        # one by one in the hooks among the forward's activations. Small long-lived blocks scattered
        # among freed activations fragment glibc's heap, which then grows instead of reusing that
        # memory. Default 4-bit model, batch 8 x 64: allocated in the hooks, the passes peaked
        # 120-150 MiB above resident in 6 of 10 runs (else ~50); allocated here, 46-69 in 6 of 6.
        for g in groups:
            if g.method == "sketch" or p == 0:
                g.acc = torch.zeros(g.d_in, g.d_in if g.method == "gram" else g.Q.shape[1], device=g.device)
        col.on_input = on_input
        with col:
            it = progress(f"basis pass {p + 1}/{n_passes}", batches) if progress else batches
            for batch in it:
                col.set_mask(batch.attention_mask if token_mask is None else token_mask(batch))
                forward(batch)
        for g in groups:
            if g.method != "sketch":
                continue
            Y = g.acc.cpu()
            g.acc = None
            if last_pass:
                Q = g.Q.cpu()
                T = Q.T @ Y  # Rayleigh-Ritz: Q^T A Q
                T = (T + T.T) / 2
                V = _top_eigvecs(T, min(cfg.rank, T.shape[0]))
                g.extras["P"] = Q @ V
                g.extras["energy"] = ((T.double() @ V.double()) * V.double()).sum(0)  # diag(V^T Q^T A Q V)
            else:
                g.Q = _orth(Y).to(g.device)

    out: dict[str, torch.Tensor] = {}
    for g in groups:
        if g.tokens < cfg.rank:
            raise UserError(
                f"calibration saw only {g.tokens} tokens, fewer than --rank {cfg.rank}: use more --calib-samples"
            )
        if g.method == "gram":
            P = _top_eigvecs(g.acc.cpu(), cfg.rank)
            energy = ((g.acc.cpu().double() @ P.double()) * P.double()).sum(0)  # diag(P^T A P)
        else:
            P, energy = g.extras["P"], g.extras["energy"]
        P = P.contiguous()
        for name in g.members:
            out[name] = P
            if energies is not None:
                energies[name] = (energy / g.tokens).float()
    return out
