"""Diagnostic: what a column scaling of the directions (``--perturb``) can do under Adam, ZO-Act's optimizer.

A ZO-Act step estimates the gradient of B as ``p Z D``: Z ~ N(0, I) shaped like B, D a scale per column of
B (``--perturb``), p = (L+ - L-) / 2 eps ~ <g, Z D>. Adam divides every coordinate by its own running RMS,
which carries the same factor D_j, so D cancels out of the step (Adam is invariant to a constant rescaling
of each coordinate's gradient): every coordinate moves about lr whatever D is, and D acts only through p,
that is, through which columns the one number a query returns listens to. Against plain N(0, I), the
step's expected descent is then

    eta(D) = sum_j D_j ||g_j||^2 / (||g|| sqrt(sum_j D_j^2 ||g_j||^2))  <= 1

(sums over every adapted layer's columns, g_j the gradient of column j of B; <= 1 by Cauchy-Schwarz, = 1
exactly when D is one constant), while the noise of the step, about lr per coordinate, is the same. So under
Adam a column scaling can only lower what a step gains: a constant one (``rank``) changes nothing,
``layer-norm`` (constant within a layer, not across layers) a little, ``whiten`` (sigma_0 / sigma_j within a
layer) the most. Under SGD the step is ``p Z D`` itself and the same scaling acts as D^2, the
preconditioner ``whiten`` was designed as; Adam takes that away.

This measures eta for each ``--perturb`` kind on the default model: the bases and their column energies as
``tune`` computes them (seed 0, 64 calibration examples), the exact gradient of every B by autograd (a
diagnostic may use it) on the first batches of ``tune``'s own stream, at the zero-shot model and, with
``--at RUN``, at a finished fp32 run's coefficients.

    python tools/diagnose_scaling.py --at runs/default   # -> docs/results/diagnose_scaling.json

About two CPU minutes on the default model.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from zoact_edge.adapters.build import build_adapters
from zoact_edge.adapters.files import load_checkpoint
from zoact_edge.config import TuneConfig
from zoact_edge.data.datasets import batch_indices
from zoact_edge.data.tasks import sampled_batches
from zoact_edge.recipes.harness import load_inputs
from zoact_edge.recipes.zoact import CALIBRATION_TAG
from zoact_edge.zo import perturb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import locked_update, read_results  # noqa: E402  (the lock + atomic write every results file shares)

PATH = Path(__file__).resolve().parents[1] / "docs" / "results" / "diagnose_scaling.json"


def _sums(energies: dict[str, torch.Tensor], scales: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """Over every layer's columns j: sum D_j e_j, sum D_j^2 e_j, sum e_j and the top columns' D_0^2 e_0.

    ``energies``: per layer, e_j = ||g_j||^2 for each column j of B; ``scales``: per layer, D (None: all ones)."""
    out = dict.fromkeys(("d", "dd", "plain", "top"), 0.0)
    for name, e in energies.items():
        D = torch.ones_like(e) if scales.get(name) is None else scales[name].to(e)
        out["d"] += float((D * e).sum())
        out["dd"] += float((D * D * e).sum())
        out["plain"] += float(e.sum())
        out["top"] += float(D[0] ** 2 * e[0])
    return out


def adam_efficiency(energies: dict[str, torch.Tensor], scales: dict[str, torch.Tensor | None]) -> float:
    """eta(D): the expected descent of an Adam ZO step with column scales D against D = 1."""
    s = _sums(energies, scales)
    return s["d"] / math.sqrt(s["plain"] * s["dd"])


def top_column_share(energies: dict[str, torch.Tensor], scales: dict[str, torch.Tensor | None]) -> float:
    """The share of what a query's p carries, E[<g, Z D>^2] = sum D_j^2 ||g_j||^2, that comes from column 0."""
    s = _sums(energies, scales)
    return s["top"] / s["dd"]


def scale_spread(scales: dict[str, torch.Tensor | None]) -> list[float]:
    """max/min of D: [within a layer, the median layer; within the most spread layer; over all layers]."""
    ds = [d.double() for d in scales.values() if d is not None]
    if not ds:
        return [1.0, 1.0, 1.0]
    within = [float(d.max() / d.min()) for d in ds]
    return [statistics.median(within), max(within), float(max(d.max() for d in ds) / min(d.min() for d in ds))]


def measure(at: str | None, batches: int) -> dict:
    cfg = TuneConfig()  # the default run: fp32, rank 16, Rotten Tomatoes, seed 0, length-grouped batches
    inputs = load_inputs(cfg)
    model, task, train = inputs.model, inputs.task, inputs.splits.train
    model.requires_grad_(False)
    calib = sampled_batches(task, train, cfg.calib_samples, cfg.batch_size, cfg.seed, CALIBRATION_TAG, inputs.device)
    col_energy: dict = {}
    layers = build_adapters(model, calib, cfg.rank, cfg.basis_method, passes=cfg.basis_passes, seed=cfg.seed,
                            energies=col_energy)
    if at:  # the run's coefficients on the same bases (the basis pass is deterministic: checked)
        state, P, B, _ = load_checkpoint(Path(at))
        if state["config"]["bits"] != 32 or set(P) != set(layers):
            sys.exit(f"--at {at}: not an fp32 run of the default targets")
        for name, layer in layers.items():
            if not torch.allclose(P[name].float(), layer.P.float(), atol=1e-5):
                sys.exit(f"--at {at}: its basis of {name} is not the one tune computes here (other seed or data?)")
            layer.B.data.copy_(B[name])
    kinds = {k: perturb.column_scales(k, layers, col_energy) for k in perturb.KINDS}
    t0, per_batch = time.time(), []
    for b in range(batches):  # the first steps' batches of tune's own stream
        idx = batch_indices(b, cfg.batch_size, len(train), cfg.seed, inputs.train_lengths)
        batch = task.collate([train[i] for i in idx]).to(inputs.device)
        for layer in layers.values():
            layer.B.requires_grad_(True)
        grads = torch.autograd.grad(task.loss(model, batch), [layer.B for layer in layers.values()])
        for layer in layers.values():
            layer.B.requires_grad_(False)
        energies = {name: g.double().pow(2).sum(0) for name, g in zip(layers, grads)}
        per_batch.append({k: {"eta": adam_efficiency(energies, s), "top_column_share": top_column_share(energies, s)}
                          for k, s in kinds.items()})
        print(f"batch {b + 1}/{batches}: " + ", ".join(f"{k} {v['eta']:.3f}" for k, v in per_batch[-1].items()),
              flush=True)
    summary = {k: {f: [statistics.fmean(p[k][f] for p in per_batch), statistics.pstdev(p[k][f] for p in per_batch)]
                   for f in ("eta", "top_column_share")} for k in kinds}
    return {"at": "zero-shot" if at is None else "tuned", "run": at, "task": cfg.task, "seed": cfg.seed,
            "rank": cfg.rank, "batch_size": cfg.batch_size, "batches": batches, "summary": summary,
            "scale_spread": {k: scale_spread(d) for k, d in kinds.items()}, "per_batch": per_batch,
            "seconds": round(time.time() - t0, 1)}


def scaling_table(data: dict) -> str:
    """Per --perturb kind and point: eta (mean ± sd over batches) and the top column's share of a query."""
    rows = ["| point | `--perturb` | max/min of D in a layer: median, largest; over all layers "
            "| η: an Adam step's expected descent "
            "against plain's | the top columns' share of what a query hears |", "|---|---|---|---|---|"]
    for r in sorted(data.get("records", []), key=lambda r: r["at"] != "zero-shot"):
        for k, s in r["summary"].items():
            eta, share = s["eta"], s["top_column_share"]
            median, largest, every = r["scale_spread"][k]
            rows.append(f"| {r['at']} | {k} | {median:.3g}, {largest:.3g}; {every:.3g} | {eta[0]:.3f} ± {eta[1]:.3f} | "
                        f"{share[0]:.3f} ± {share[1]:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--at", metavar="RUN", default=None, help="also measure at this finished default fp32 run")
    p.add_argument("--batches", type=int, default=4, help="training batches (tune's first steps' batches)")
    p.add_argument("--output", default=str(PATH))
    args = p.parse_args(argv)
    for at in [None] + ([args.at] if args.at else []):
        rec = measure(at, args.batches)

        def replace_point(data: dict, rec=rec) -> None:  # one record per point: a rerun replaces it
            data["records"] = [r for r in data["records"] if r["at"] != rec["at"]] + [rec]

        locked_update(Path(args.output), replace_point)
    print(scaling_table(read_results(Path(args.output))))


if __name__ == "__main__":
    main()
