"""Diagnostic: how much one forward pair can teach, per searched space (gradient energy over curvature).

A two-point ZO step searches a space S (ZO-Act's coefficients B, a random subspace's B, MeZO's full
weights) along a Gaussian direction z. For SGD along ``c z`` (c = <g, z>) on a locally quadratic loss
with gradient g and Hessian H in S, a step of size lr changes the loss on average by

    -lr ||g||^2 + lr^2 / 2 (||g||^2 tr H + 2 g^T H g),

so what one query can gain depends not only on how much of the gradient a space holds
(``tools/diagnose_basis.py``) but on the curvature a random direction in it meets: a space that
captures the gradient by capturing the activations' high-energy directions captures their curvature too.

This script measures both, on the same training batches (the first of ``tune``'s stream), for each
space as ``tune`` builds it:

- ``||g||^2`` exactly, by backprop (autograd is allowed here: this is a diagnostic);
- the curvature forward-only, from the very probes a ZO step makes: the second difference
  ``(L(+eps z) + L(-eps z) - 2 L(0)) / eps^2`` ~ ``z^T H z``, z drawn as the method draws it (ZO-Act:
  each layer's ``direction``; MeZO: N(0, I) weights), eps the method's own or ``--eps``. Its mean
  estimates tr H (Hutchinson), which here changes sign from batch to batch; its root mean square
  (:func:`curvature_rms`) is the size of the curvature a query meets. The first difference is checked
  against the exact ``<g, z>`` (``fd_rel_error``).

``--at RUN`` compares the spaces at a finished fp32 run's tuned point (its B P^T merged into the
weights) rather than at the zero-shot model.

    zoact-edge tune --output runs/default                  # the default fp32 run (0.570 -> 0.720)
    python tools/diagnose_curvature.py --at runs/default   # -> docs/results/diagnose_curvature.json
    python tools/diagnose_curvature.py                     # the same spaces at the zero-shot model
    python tools/diagnose_curvature.py --spaces mezo --eps 1e-3 [--at runs/default]  # MeZO at ZO-Act's eps

About three CPU minutes per space on the default model; records are appended, done ones skipped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from zoact_edge.adapters.build import build_adapters
from zoact_edge.adapters.files import load_checkpoint
from zoact_edge.adapters.layer import noise_like
from zoact_edge.adapters.targets import BLOCK_INDEX, find_targets, is_conv1d
from zoact_edge.config import TuneConfig
from zoact_edge.data.datasets import batch_indices
from zoact_edge.data.tasks import sampled_batches
from zoact_edge.recipes.harness import load_inputs
from zoact_edge.recipes.zoact import CALIBRATION_TAG
from zoact_edge.seeds import derive_seed
from zoact_edge.zo.baselines import mezo_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import locked_update, read_results  # noqa: E402  (the lock + atomic write every results file shares)

PATH = Path(__file__).resolve().parents[1] / "docs" / "results" / "diagnose_curvature.json"
PROBE_TAG = 0xC0B7  # the probes' directions, apart from every stream tune draws
# space -> (basis, rank, eps): eps as swept for each method on rotten-tomatoes (docs/results/sweep.json)
SPACES = {
    "zoact-r16": ("auto", 16, 1e-3),
    "zoact-r1": ("auto", 1, 1e-3),
    "subspace-r16": ("random", 16, 1e-3),
    "mezo": (None, 0, 1e-2),
}


# Parts of the rank-16 activation space (``zoact-r16:PART``): is there a part where a query gains more?
PARTS = {
    "col0": lambda name, col: col == 0,  # the top (mean-like) direction of every layer's input
    "col1-3": lambda name, col: 1 <= col <= 3,
    "col4-15": lambda name, col: col >= 4,
    "attn": lambda name, col: name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": lambda name, col: name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj"),
    "lower": lambda name, col: _block(name) < 15,  # the default model's 30 blocks, halved
    "upper": lambda name, col: _block(name) >= 15,
}


def _block(name: str) -> int:
    return int(BLOCK_INDEX.search(name).group(1))


class Space:
    """The searched tensors and how the method draws a direction in them."""

    def __init__(self, tensors: list[torch.Tensor], draw, names: list[str] | None = None):
        self.tensors, self.draw, self.names = tensors, draw, names

    def restrict(self, part: str) -> list[torch.Tensor]:
        """0/1 masks (like the tensors) of the coefficients in ``part``, and the draw restricted to them."""
        keep = PARTS[part]
        masks = []
        for name, t in zip(self.names, self.tensors):
            cols = torch.tensor([float(keep(name, c)) for c in range(t.shape[1])], dtype=t.dtype)
            masks.append(cols.expand(t.shape).contiguous())
        draw = self.draw
        self.draw = lambda seed: [z * m for z, m in zip(draw(seed), masks)]
        return masks

    @torch.no_grad()
    def shift(self, dirs: list[torch.Tensor], scale: float) -> None:
        for t, z in zip(self.tensors, dirs):
            t.add_(z, alpha=scale)


def probe(loss_fn, space: Space, dirs: list[torch.Tensor], eps: float, l0: float) -> tuple[float, float]:
    """(first difference, second difference) along ``dirs``: ~ <g, z> and ~ z^T H z. The tensors are put back."""
    space.shift(dirs, +eps)
    plus = loss_fn()
    space.shift(dirs, -2 * eps)
    minus = loss_fn()
    space.shift(dirs, +eps)
    return (plus - minus) / (2 * eps), (plus + minus - 2 * l0) / eps ** 2


def build_space(name: str, cfg: TuneConfig, inputs) -> Space:
    basis, rank, _ = SPACES[name]
    model, task = inputs.model, inputs.task
    model.requires_grad_(False)
    if basis is None:  # MeZO: the targeted linears' full weights, z ~ N(0, I) as mezo_step draws it
        weights = mezo_params(model, [t.name for t in find_targets(model, cfg.targets, cfg.layers)])
        return Space(weights, lambda seed: [noise_like(w, derive_seed(seed, i)) for i, w in enumerate(weights)])
    calib = sampled_batches(task, inputs.splits.train, cfg.calib_samples, cfg.batch_size, cfg.seed,
                            CALIBRATION_TAG, inputs.device)
    built = build_adapters(model, calib, rank, basis, seed=cfg.seed)  # the bases tune computes
    layers = list(built.values())
    return Space([layer.B for layer in layers],
                 lambda seed: [layer.direction(derive_seed(seed, i)) for i, layer in enumerate(layers)], list(built))


@torch.no_grad()
def merge_run(model, run: str) -> None:
    """Fold a finished fp32 run's update B P^T into the weights: the point where the spaces are compared."""
    _, P, B, _ = load_checkpoint(Path(run))
    for name, b in B.items():
        module = model.get_submodule(name)
        delta = b.double() @ P[name].double().T
        if is_conv1d(module):  # GPT-2 stores W transposed (d_in x d_out)
            delta = delta.T
        module.weight.add_(delta.to(module.weight.dtype))


def measure(name: str, task_name: str, seed: int, batches: int, probes: int, batch_size: int, at: str | None,
            eps: float | None = None) -> dict:
    base, _, part = name.partition(":")
    eps = eps or SPACES[base][2]
    cfg = replace(TuneConfig(), task=task_name, seed=seed, rank=max(SPACES[base][1], 1), batch_size=batch_size)
    inputs = load_inputs(cfg)
    if at:
        merge_run(inputs.model, at)
    space = build_space(base, cfg, inputs)
    masks = space.restrict(part) if part else None
    coefficients = int(sum(t.numel() for t in space.tensors) if masks is None else sum(float(m.sum()) for m in masks))
    model, task, train = inputs.model, inputs.task, inputs.splits.train
    t0 = time.time()

    def loss(batch) -> float:
        with torch.no_grad():
            return float(task.loss(model, batch).double())

    per_batch = []
    for b in range(batches):  # the first steps' batches of tune's own stream
        batch = task.collate([train[i] for i in batch_indices(b, batch_size, len(train), seed)]).to(inputs.device)
        for t in space.tensors:
            t.requires_grad_(True)
        grads = torch.autograd.grad(task.loss(model, batch), space.tensors)
        if masks is not None:
            grads = [g * m for g, m in zip(grads, masks)]
        for t in space.tensors:
            t.requires_grad_(False)
        g_sq = sum(float(g.double().pow(2).sum()) for g in grads)
        l0 = loss(batch)
        curv, first, exact = [], [], []
        for k in range(probes):
            dirs = space.draw(derive_seed(seed, PROBE_TAG, b, k))
            c, h = probe(lambda: loss(batch), space, dirs, eps, l0)
            first.append(c)
            curv.append(h)
            exact.append(sum(float((g.double() * z.double()).sum()) for g, z in zip(grads, dirs)))
        per_batch.append({
            "grad_sq": g_sq, "trace_h": statistics.fmean(curv),
            "trace_h_se": statistics.stdev(curv) / math.sqrt(probes),
            "mean_c_sq": statistics.fmean(c * c for c in first),
            "fd_rel_error": math.sqrt(sum((f - e) ** 2 for f, e in zip(first, exact)) / sum(e * e for e in exact)),
        })
        print(f"{name} batch {b + 1}/{batches}: ||g||^2 {g_sq:.4g}  tr H {per_batch[-1]['trace_h']:.4g} "
              f"+/- {per_batch[-1]['trace_h_se']:.2g}", flush=True)
    g_sq = statistics.fmean(p["grad_sq"] for p in per_batch)
    trace = statistics.fmean(p["trace_h"] for p in per_batch)
    return {"space": name, "task": task_name, "seed": seed, "at": "zero-shot" if at is None else "tuned",
            "batch_size": batch_size, "batches": batches,
            "probes_per_batch": probes, "eps": eps, "coefficients": coefficients,
            "grad_sq": g_sq, "trace_h": trace,
            "trace_h_se": math.sqrt(sum(p["trace_h_se"] ** 2 for p in per_batch)) / batches,
            "per_batch": per_batch, "seconds": round(time.time() - t0, 1)}


def curvature_rms(record: dict) -> float:
    """sqrt(E[(z^T H z)^2]) = sqrt(tr(H)^2 + 2 ||H||_F^2) over the record's probes, from each batch's mean and s.e.

    The size of the curvature one query meets, whatever its sign: the loss is far from convex here (a
    batch's tr H is as often negative as positive), so the trace alone averages to about nothing.
    """
    n = record["probes_per_batch"]
    return math.sqrt(statistics.fmean(_mean_square(b, n) for b in record["per_batch"]))


def _mean_square(batch: dict, n: int) -> float:
    """One batch's mean of (z^T H z)^2 over its n probes: mean^2 plus the probes' variance (1/n form)."""
    return batch["trace_h"] ** 2 + (batch["trace_h_se"] * math.sqrt(n)) ** 2 * (n - 1) / n


def per_curvature(curv: dict | None, space: str) -> float | None:
    """||g||^2 / rms(z^T H z) of ``space`` at the tuned point on rotten-tomatoes, probed at eps 1e-3."""
    recs = [r for r in (curv or {}).get("records", [])
            if (r["task"], r["space"], r["at"], r["eps"]) == ("rotten-tomatoes", space, "tuned", 1e-3)]
    return recs[0]["grad_sq"] / curvature_rms(recs[0]) if recs else None


def curvature_table(curv: dict) -> str:
    """Per searched space: gradient energy and the curvature a random direction meets, each also as a share of
    MeZO's (full weights, same task, point and probe size), and their ratio."""
    recs = curv.get("records", [])
    rows = ["| task | point | space | probe eps | coefficients | ‖g‖² | share of MeZO's | mean tr H ± s.e. | "
            "rms zᵀHz | share of MeZO's | ‖g‖² / rms zᵀHz | per batch, mean ± sd |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ["zoact-r16", "zoact-r1", "subspace-r16", "mezo"]
    for r in sorted(recs, key=lambda r: (r["task"], r["at"] != "tuned", order.index(r["space"].partition(":")[0]),
                                         r["space"], -r["eps"])):
        ref = next((m for m in recs if m["space"] == "mezo"
                    and (m["task"], m["at"], m["eps"]) == (r["task"], r["at"], 1e-3)), None)
        g_share = "—" if ref is None else f"{r['grad_sq'] / ref['grad_sq']:.3f}"
        per_batch = [b["grad_sq"] / math.sqrt(_mean_square(b, r["probes_per_batch"])) for b in r["per_batch"]]
        c_share = "—" if ref is None else f"{curvature_rms(r) / curvature_rms(ref):.3f}"
        rows.append(f"| {r['task']} | {r['at']} | {r['space']} | {r['eps']:g} | {r['coefficients']:,} | "
                    f"{r['grad_sq']:.4g} | {g_share} | {r['trace_h']:.4g} ± {r['trace_h_se']:.2g} | "
                    f"{curvature_rms(r):.4g} | {c_share} | {r['grad_sq'] / curvature_rms(r):.3f} | "
                    f"{statistics.mean(per_batch):.3f} ± {statistics.stdev(per_batch):.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spaces", default=",".join(SPACES), help=f"comma-separated, of: {', '.join(SPACES)}")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=4, help="training batches (tune's first steps' batches)")
    p.add_argument("--probes", type=int, default=12, help="directions per batch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eps", type=float, default=None, help="probe size for every space (default: each method's own)")
    p.add_argument("--at", metavar="RUN", default=None,
                   help="a finished fp32 zoact run folder: compare the spaces at its tuned point (B P^T merged) "
                        "instead of at the zero-shot model")
    p.add_argument("--output", default=str(PATH))
    args = p.parse_args(argv)
    unknown = [n for n in args.spaces.split(",") if n.partition(":")[0] not in SPACES
               or (n.partition(":")[2] and (n.partition(":")[0] == "mezo" or n.partition(":")[2] not in PARTS))]
    if unknown:
        sys.exit(f"unknown space(s): {', '.join(unknown)} (choose from {', '.join(SPACES)}; "
                 f"an activation or random space may name a part: SPACE:PART, PART one of {', '.join(PARTS)})")
    at = "zero-shot" if args.at is None else "tuned"
    for name in args.spaces.split(","):
        key = (name, args.task, args.seed, at, args.batches, args.probes, args.batch_size,
               args.eps or SPACES[name.partition(":")[0]][2])
        if any((r["space"], r["task"], r["seed"], r["at"], r["batches"], r["probes_per_batch"], r["batch_size"],
                r["eps"]) == key
               for r in read_results(Path(args.output))["records"]):
            continue
        rec = measure(name, args.task, args.seed, args.batches, args.probes, args.batch_size, args.at, args.eps)
        locked_update(Path(args.output), lambda d: d["records"].append(rec))
        print(f"{args.task} {name} ({at}): ||g||^2 {rec['grad_sq']:.4g}, tr H {rec['trace_h']:.4g} +/- "
              f"{rec['trace_h_se']:.2g}, rms z^T H z {curvature_rms(rec):.4g} ({rec['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
