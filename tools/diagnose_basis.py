"""Diagnostic: how much of the true gradient each basis holds, and how well one ZO query points.

Autograd is allowed here (it is a diagnostic, not the method). On the task's training split:

1. Bases of rank 16 from the calibration pass ``tune`` runs (its 64 examples, exact Gram),
   once from all real tokens and once from the scored position only (``--calib-tokens``), and a
   random orthonormal basis per input group (``--method subspace``). Ranks 1 and 4 are the
   leading columns (the top eigenvectors are nested).
2. The true gradient dL/dW of every targeted linear, summed over ``--grad-samples`` other
   training examples, by backprop.
3. Per layer type and rank: the fraction of ||dL/dW||^2 inside the basis' span, ||dL/dW P||^2 /
   ||dL/dW||^2 (the best a rank-r update in that basis can do).
4. For one query, the cosine between the ZO estimate and the true gradient, over all layers
   together (what one step sees), averaged over ``--queries`` draws of Z:
   - in B (``cos_B``): the estimate c Z against dL/dB = dL/dW P, c = <dL/dB, Z> exactly (no eps
     error). For Z ~ N(0, I) this is about sqrt(2 / (pi d)) for d coefficients, whatever the basis;
   - in weight space (``cos_W``): the update c Z P^T against dL/dW, about sqrt(2 f / (pi d)) with f
     the captured energy. MeZO (Z over the full weights) is the f = 1, d = all weights case.
   Also for the whitened perturbation (``--perturb whiten``).

    python tools/diagnose_basis.py                   # docs/results/diagnose_basis.{json,png}

Takes a few CPU minutes on the default model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.basis import BasisConfig, compute_bases
from zoact_edge.adapters.subspace import input_groups, random_bases
from zoact_edge.config import TuneConfig
from zoact_edge.data.datasets import sample_indices
from zoact_edge.data.tasks import build_task, hidden_states, sampled_batches, scored_mask
from zoact_edge.models import load_model
from zoact_edge.paths import atomic_write
from zoact_edge.recipes.zoact import CALIBRATION_TAG
from zoact_edge.zo.estimator import derive_seed

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
RANKS = (1, 4, 16)
GRAD_TAG = 0xD1A6  # the gradient examples' draw, apart from the calibration examples'


def layer_type(name: str) -> str:
    return re.split(r"\.", name)[-1]


def true_gradients(model, task, examples, names, batch_size=8) -> dict[str, torch.Tensor]:
    """dL/dW (d_out x d_in, fp64) of the mean loss over ``examples``, for the named linears."""
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    grads = {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in weights.items()}
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        loss = task.loss(model, task.collate(chunk)) * len(chunk) / len(examples)
        for n, g in zip(names, torch.autograd.grad(loss, [weights[n] for n in names])):
            grads[n] += g.double()
    for w in weights.values():
        w.requires_grad_(False)
    return grads


def captured(grads, bases, r) -> dict[str, float]:
    return {n: float((g @ bases[n][:, :r].double()).pow(2).sum() / g.pow(2).sum()) for n, g in grads.items()}


def zo_cosines(grads, bases, r, queries, seed, scales=None) -> dict:
    """Mean cosines (in B and in W) of one-query estimates with the true gradient, all layers at once."""
    gB = {n: g @ bases[n][:, :r].double() for n, g in grads.items()}
    normB = math.sqrt(sum(float(v.pow(2).sum()) for v in gB.values()))
    normW = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    cos_b, cos_w = [], []
    for q in range(queries):
        gen = torch.Generator().manual_seed(derive_seed(seed, q))
        dirs = {}
        for n, v in gB.items():
            z = torch.randn(v.shape, generator=gen, dtype=torch.float64)
            dirs[n] = z if scales is None else z * scales[n][:r].double()
        c = sum(float((gB[n] * d).sum()) for n, d in dirs.items())  # the exact directional derivative
        est_norm_b = abs(c) * math.sqrt(sum(float(d.pow(2).sum()) for d in dirs.values()))
        cos_b.append(c * sum(float((gB[n] * d).sum()) for n, d in dirs.items()) / (est_norm_b * normB))
        # weight space: update c * d P^T; <d P^T, G> = <d, G P>; ||d P^T|| = ||d|| (orthonormal P)
        cos_w.append(c * c / (est_norm_b * normW))
    return {"cos_B": sum(cos_b) / queries, "cos_W": sum(cos_w) / queries,
            "coefficients": sum(v.numel() for v in gB.values()),
            "captured_total": normB ** 2 / normW ** 2}


def mezo_cosine(grads, queries, seed) -> dict:
    """MeZO's one-query cosine: sampled (few draws: 135M weights each) and the closed form.

    For Z ~ N(0, I_D), cos = |<G, Z>| / (||G|| ||Z||) has mean sqrt(2 / pi) / sqrt(D) up to O(1/D).
    """
    normW = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    D = sum(g.numel() for g in grads.values())
    cos = []
    for q in range(queries):
        gen = torch.Generator().manual_seed(derive_seed(seed, 1000 + q))
        c, zz = 0.0, 0.0
        for g in grads.values():
            z = torch.randn(g.shape, generator=gen, dtype=torch.float64)
            c += float((g * z).sum())
            zz += float(z.pow(2).sum())
        cos.append(c * c / (abs(c) * math.sqrt(zz) * normW))
    return {"cos_W": sum(cos) / queries, "cos_W_closed_form": math.sqrt(2 / math.pi / D), "coefficients": D}


def whiten_scales(bases, energies) -> dict[str, torch.Tensor]:
    return {n: (e[0] / e.clamp(min=float(e[0]) * 1e-12)).sqrt() for n, e in energies.items()}


def by_type(values: dict[str, float]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for n, v in values.items():
        out.setdefault(layer_type(n), []).append(v)
    return {t: sum(v) / len(v) for t, v in out.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    types = list(result["captured"]["all"]["16"].keys())
    width = 0.8 / 9
    for k, (basis, r) in enumerate([(b, r) for b in ("all", "scored", "random") for r in RANKS]):
        vals = [result["captured"][basis][str(r)][t] for t in types]
        axes[0].bar([i + k * width for i in range(len(types))], vals, width, label=f"{basis} r={r}")
    axes[0].set_xticks([i + 0.4 for i in range(len(types))], types, rotation=30)
    axes[0].set_ylabel("fraction of ||dL/dW||^2 in span(P)")
    axes[0].set_title("gradient energy captured (mean over blocks)")
    axes[0].set_ylim(0, 1.3)
    axes[0].legend(fontsize=7, ncol=3, loc="upper center")
    rows = result["zo_cosine"]
    labels = list(rows)
    # MeZO: the closed form (its sampled mean rests on two draws of 106M-dimensional Z)
    axes[1].barh(labels, [rows[k].get("cos_W_closed_form", rows[k]["cos_W"]) for k in labels])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("mean cosine of a one-query estimate with dL/dW (weight space)")
    axes[1].set_title("one ZO query, all layers together")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--model", default=None)
    p.add_argument("--grad-samples", type=int, default=64)
    p.add_argument("--queries", type=int, default=32, help="draws of Z per cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "diagnose_basis.json"))
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    args = p.parse_args(argv)
    if args.replot:
        return plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
    torch.manual_seed(args.seed)

    cfg = TuneConfig(model=args.model, task=args.task, rank=max(RANKS), seed=args.seed)
    loaded = load_model(cfg.model, 32, device="cpu")
    model = loaded.model
    task, splits = build_task(cfg, loaded.tokenizer)
    found = tgt.find_targets(model)
    modules = {t.name: model.get_submodule(t.name) for t in found}
    d_in = {t.name: t.d_in for t in found}
    calib = sampled_batches(task, splits.train, cfg.calib_samples, cfg.batch_size, cfg.seed, CALIBRATION_TAG,
                            torch.device("cpu"))

    def fwd(b):
        with torch.inference_mode():
            hidden_states(model, b)

    bases, energies = {}, {}
    for kind, mask in (("all", None), ("scored", scored_mask)):
        energies[kind] = {}
        bases[kind] = compute_bases(modules, d_in, calib, fwd, BasisConfig(rank=cfg.rank, method="gram", seed=cfg.seed),
                                    token_mask=mask, energies=energies[kind])
        print(f"bases ({kind} tokens) done", file=sys.stderr, flush=True)
    groups = input_groups(modules, lambda: fwd(calib[0]))
    bases["random"] = random_bases(groups, d_in, cfg.rank, cfg.seed)

    idx = sample_indices(len(splits.train), args.grad_samples, args.seed, GRAD_TAG)
    grads = true_gradients(model, task, [splits.train[i] for i in idx], [t.name for t in found])
    print("gradients done", file=sys.stderr, flush=True)

    result = {
        "model": loaded.folder,
        "task": args.task,
        "grad_samples": args.grad_samples,
        "calib_samples": cfg.calib_samples,
        "queries": args.queries,
        "captured": {},
        "captured_per_layer": {},
        "zo_cosine": {},
        "column_rms_ratio": {},
    }
    for kind in ("all", "scored", "random"):
        result["captured"][kind], result["captured_per_layer"][kind] = {}, {}
        for r in RANKS:
            per_layer = captured(grads, bases[kind], r)
            result["captured"][kind][str(r)] = by_type(per_layer)
            result["captured_per_layer"][kind][str(r)] = per_layer
    # sigma_0 / sigma_1 and sigma_1 / sigma_15 of the all-token basis, per layer type
    e = energies["all"]
    result["column_rms_ratio"] = {
        "s0/s1": by_type({n: math.sqrt(float(v[0] / v[1])) for n, v in e.items()}),
        "s1/s15": by_type({n: math.sqrt(float(v[1] / v[15])) for n, v in e.items()}),
    }
    result["zo_cosine"]["mezo (full weights)"] = mezo_cosine(grads, 2, args.seed)
    for kind in ("all", "scored", "random"):
        for r in RANKS:
            result["zo_cosine"][f"{kind} r={r}"] = zo_cosines(grads, bases[kind], r, args.queries, args.seed)
    white = whiten_scales(bases["all"], energies["all"])
    result["zo_cosine"]["all r=16 whiten"] = zo_cosines(grads, bases["all"], 16, args.queries, args.seed, white)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        json.dump(result, f, indent=1)
    plot(result, out.with_suffix(".png"))
    for kind in ("all", "scored", "random"):
        for r in RANKS:
            row = result["captured"][kind][str(r)]
            print(f"{kind:6s} r={r:2d} " + " ".join(f"{t}={v:.3f}" for t, v in row.items()))
    for k, v in result["zo_cosine"].items():
        print(f"{k:22s} cos_W={v['cos_W']:.2e} cos_B={v.get('cos_B', float('nan')):.2e} d={v['coefficients']}")


if __name__ == "__main__":
    main()
